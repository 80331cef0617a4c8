"""The REST API's routes under /api/v1, one module per area: inventory (sites, pairing,
VMs, volumes), vpgs (VPGs, checkpoints, status), operations (failover test, recovery
settings), failover (live failover, commit, rollback), backup (extended recovery) and
activity (events, alerts, tasks, metric history, API tokens).  Each module builds its
router for one SiteContext."""

from zcore.site.api.routes.activity import activity_router, health_router
from zcore.site.api.routes.backup import backup_router
from zcore.site.api.routes.failover import failover_router
from zcore.site.api.routes.inventory import inventory_router
from zcore.site.api.routes.operations import operations_router
from zcore.site.api.routes.vpgs import vpg_router

__all__ = ["activity_router", "backup_router", "failover_router", "health_router",
           "inventory_router", "operations_router",
           "vpg_router"]
