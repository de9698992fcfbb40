"""Benchmark harness: `python -m bench` measures the service against a ceiling and a baseline.

One run, on one machine, under one server stack: a do-nothing FastAPI endpoint (the ceiling of
what the stack can do with a ~6 KB body), a naive peer implementation of /encode (the baseline),
the TorchScript model in-process (the compute floor), and the real service. See `bench.run`.
"""
