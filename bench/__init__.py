"""ovlrun benchmarks (run as root: `python3 bench/run.py`). Not part of the test suite."""
