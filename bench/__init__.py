"""Benchmarks that print figures (never timed tests); see DESIGN.md section 7."""
