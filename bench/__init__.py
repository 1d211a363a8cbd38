"""aiosd benchmarks: scripts, not tests.  Run ``.venv/bin/python bench/run.py --help``."""
