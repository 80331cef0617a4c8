"""The site service: one zcore process per site (docs/architecture.md, issue 10).

Its parts: the database (zcore.site.db), the REST API (zcore.site.api), the task runner
(zcore.site.tasks) and the error codes they share (zcore.site.errors); the recovery-site
VPG (zcore.site.recovery_vpg), metric history (zcore.site.metrics) and VPG-wide retention
(zcore.site.retention).  Import from the modules; this facade stays light so
`import zcore.site` needs neither FastAPI nor a database driver.
"""
