"""The site service: one zcore process per site (issue 10)."""
