"""Jobs: what ovlrun did for each job (records), what a job sees (status) and which
snapshots running jobs use (inuse)."""
