"""Shared helpers of the tests (no tests here): import as `from helpers.X import ...`."""
