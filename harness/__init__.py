"""Test and benchmark harness: fixture models (built once, cached by builder digest), real
vLLM servers and redis-server on loopback, corpora, measurement plumbing.

Not shipped in the wheel. ``tests`` and ``benchmarks`` import it; it imports neither, and
the product never imports it (``tests/unit/test_layout.py`` checks both).
"""
