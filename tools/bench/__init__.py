"""Benchmarks whose reports live in docs/bench/."""
