"""What the tests and benchmarks need beside the project: third-party data, found or fetched (fixtures.py).

Not part of the pipeline: no step script, flow or endpoint imports it.
"""
