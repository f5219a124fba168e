"""Benchmarks of supermask_fx (not part of the installed package). Run ``python -m benchmarks.speed --help``."""
