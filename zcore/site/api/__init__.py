"""The REST API of the site service (FastAPI): `create_app(SiteContext(db, backend))`.

Modules: app (the factory), auth (bearer tokens, body limit), errors (the one error shape),
models (request and response bodies), backend (the SiteBackend protocol the service
implements), memory (a database-backed SiteBackend for tests), routes (one module per area).
"""

from zcore.site.api.app import create_app
from zcore.site.api.backend import DEFAULT_BODY_LIMIT, SiteBackend, SiteContext
from zcore.site.api.memory import DbSiteBackend

__all__ = ["DEFAULT_BODY_LIMIT", "DbSiteBackend", "SiteBackend", "SiteContext", "create_app"]
