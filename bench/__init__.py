"""Benchmarks of the HPO pipeline: orchestration efficiency, sample efficiency, scale (see README.md)."""
