"""Benchmarks: decoding speed (``decode``) and serving throughput (``serving``)."""
