"""Test helpers that ship with traceml: deterministic synthetic runs (``traceml.testing.synthetic``)
for tests and benchmarks that need a recording or a filled store without a training run.

Imports the store and, lazily, the format room; never torch, never ``replay``.
"""
