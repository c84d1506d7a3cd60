"""Benchmark suites (pytest-benchmark): provider × shape × dtype × mode, the harness in conftest.py, the report."""
