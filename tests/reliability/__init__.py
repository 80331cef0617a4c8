"""The reliability program (issue 9)."""
