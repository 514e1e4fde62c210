"""Scaled-down CPU reproduction of the paper's accuracy/latency trade-off; entry point
examples/reproduce_tradeoff.py, method and findings in docs/RESULTS.md."""
