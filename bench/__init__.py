"""Benchmarks: each measures side by side in one run and writes JSON (+ Markdown) results.

Committed results live in ``bench/results/``.
"""
