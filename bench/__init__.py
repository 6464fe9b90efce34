"""Benchmarks of one optimizer step: ``python -m bench`` (see bench/README.md) and ``pytest bench
--benchmark-only``."""
