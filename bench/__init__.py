"""Benchmarks, run as modules from the repository root: `.venv/bin/python -m bench.<dir>.<script>` (see each RESULTS.md)."""
