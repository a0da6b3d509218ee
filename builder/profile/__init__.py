"""Profiling: measured peak memory per variant and workload, and its report."""
