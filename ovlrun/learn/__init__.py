"""Learning profiles from real jobs: ``ovlrun learn``, ``learn watch``, ``learn propose``.

Modules, in the order data flows through them:

- :mod:`.job` runs one job under a tracer (a gate holds its first process until the
  tracer is attached); :mod:`.view` is what that process does first (a profile's view,
  the privilege drop); :mod:`.tracers` starts, reads and stops :mod:`.bpftrace`
  (programs and output) and :mod:`.strace` (command line and parser), through
  :mod:`.spawn` (children that die with learn);
- :mod:`.events` is the one shape every tracer's records take; :mod:`.resolve` makes
  their paths absolute;
- :mod:`.trees` says which tree and release directory a path is in, and what a job has
  localised; :mod:`.report` counts and shows; :mod:`.propose` writes a profile;
- :mod:`.watch` counts node-wide; :mod:`.summaries` keeps, publishes and reads node
  summaries;
- :mod:`.cli` is the command line (``python -m ovlrun.learn`` until it is an entry of
  ovlrun's command table).
"""
