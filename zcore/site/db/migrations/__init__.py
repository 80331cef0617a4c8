"""Alembic migration scripts of the site database (run by zcore.site.db.migrate, never by
the alembic command line: there is no alembic.ini)."""
