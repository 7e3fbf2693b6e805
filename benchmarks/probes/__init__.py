"""Probes: narrower measurements than `benchmarks.bench`, each of one thing the product
still does, run as `python -m benchmarks.probes.<name> --out FILE.json`. Each needs a GPU
to measure; without one it runs the same code on the demo model (what the tests check),
which is no measurement."""
