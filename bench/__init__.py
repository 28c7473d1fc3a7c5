"""Benchmarks that print figures (never timed tests); see docs/benchmarks.md."""
