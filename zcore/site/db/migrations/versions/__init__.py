"""Schema revisions, oldest first: 0001 (base), 0002, ..."""
