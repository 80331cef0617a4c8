"""The REST API's application factory: `create_app(ctx)` builds the FastAPI app of one
site over a SiteContext (its database and the backend of the running service).

Sits under the site service, which serves the app with uvicorn on its own event loop, and
over zcore.site.api.routes.  Everything is under /api/v1; the OpenAPI document is
/api/v1/openapi.json; no interactive docs (they would need their own unauthenticated
static files).  The browser UI (zcore.site.ui) is served at `/` by the outermost
middleware.
"""

from __future__ import annotations

from fastapi import FastAPI

from zcore.site.api.auth import PREFIX, Gate
from zcore.site.api.backend import SiteContext
from zcore.site.api.errors import install_error_handlers
from zcore.site.api.routes import (
    activity_router,
    backup_router,
    failover_router,
    health_router,
    inventory_router,
    operations_router,
    vpg_router,
)

DESCRIPTION = """The REST API of a zcore site service.

Authenticate with `Authorization: Bearer TOKEN`. Errors are
`{"error": {"code", "message", "details"}}` with a stable code. Long operations answer
202 with a task; poll `/api/v1/tasks/{id}`."""


def create_app(ctx: SiteContext) -> FastAPI:
    """The API of the site `ctx` describes.  Building it does no I/O."""
    from zcore.site.ui import UiGate  # here: zcore.site.ui imports this package's modules

    app = FastAPI(
        title="zcore site API",
        version=ctx.version,
        description=DESCRIPTION,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    for router in (
        health_router(ctx),
        inventory_router(ctx),
        vpg_router(ctx),
        operations_router(ctx),
        failover_router(ctx),
        activity_router(ctx),
        backup_router(ctx),
    ):
        app.include_router(router, prefix=PREFIX)
    app.add_middleware(Gate, ctx=ctx)
    app.add_middleware(UiGate, ctx=ctx)  # outermost: the browser UI's pages and sessions
    return app
