"""The site service: one zcore process per site (DESIGN.md, issue 10).

This package is its spine: the database (zcore.site.db), the REST API (zcore.site.api),
the task runner (zcore.site.tasks) and the error codes they share (zcore.site.errors).
Import from the subpackages; this facade stays light so `import zcore.site` needs neither
FastAPI nor a database driver.
"""
