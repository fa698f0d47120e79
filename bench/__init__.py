"""Benchmarks and measurement scripts, run from the repository root as modules: ``python -m bench.<name>``."""
