"""Tests of the site service (zcore.site): database, migrations, REST API, task runner.

A package, so its conftest is `site_service.conftest` and never shadows tests/conftest.py
(which the other test modules import as `conftest`); not named `site`, which would shadow
the standard library's `site` module."""
