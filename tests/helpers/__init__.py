"""Helpers shared by the tests (imported as `helpers.NAME`; tests/ is on sys.path)."""
