"""Helpers shared by the test suites (simulated hosts, ...)."""
