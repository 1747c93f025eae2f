"""Benchmarks: PIE-Bench and the shapes benchmark in its format, run through the batch runner."""
