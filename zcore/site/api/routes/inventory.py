"""Routes for this site and its peers (pairing), VMs and volumes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from zcore.errors import ConfigError, HypervisorError
from zcore.hypervisor import QemuAddress, probe_node
from zcore.site.api import models as m
from zcore.site.api.auth import PREFIX
from zcore.site.api.backend import SiteContext, VolumeSpec
from zcore.site.api.routes.common import (
    ERRORS,
    LIMIT_MAX,
    PROTECTED,
    RecordsJson,
    out,
    outs,
    page_response,
)
from zcore.site.db import VmRecord, VolumeRecord

NamePath = Annotated[str, Path(max_length=128)]
VMS_JSON = RecordsJson(VmRecord, m.Vm, {"volumes": (VolumeRecord, m.Volume)})


async def _spec(v: m.VolumeSpec) -> VolumeSpec:
    """The backend's spec; a running QEMU's disk is probed (its size, and whether it can
    be protected: a clear 422 when not) and recorded as its `qemu:` address."""
    if v.qmp is None or v.node is None:  # a file or device: the model requires its size
        return VolumeSpec(v.name, v.size or 0, v.path, str(v.role))
    try:
        info = await asyncio.to_thread(probe_node, v.qmp, v.node)
    except HypervisorError as exc:
        raise ConfigError(f"volume {v.name}: {exc}") from None
    if v.size is not None and v.size != info.size:
        raise ConfigError(f"volume {v.name}: node {v.node} is {info.size} bytes, not "
                          f"{v.size}")
    return VolumeSpec(v.name, info.size, str(QemuAddress(v.qmp, v.node, v.nbd)), str(v.role))


# long by design: the routes are nested functions closing over ctx, one per endpoint
def inventory_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(dependencies=PROTECTED, responses=ERRORS)
    b = ctx.backend

    @r.get("/sites", tags=["sites"], summary="This site and its paired peers")
    async def get_sites() -> m.Sites:
        site = await b.site()
        return m.Sites(site=out(m.Site, site), peers=outs(m.Peer, await b.peers()))

    @r.post("/pairing/tokens", tags=["sites"], status_code=201, summary="Issue a pairing token")
    async def issue_pairing_token() -> m.PairingToken:
        return out(m.PairingToken, await b.issue_pairing_token())

    @r.post("/pairing", tags=["sites"], status_code=201, summary="Pair with a peer site")
    async def pair(body: m.PairRequest) -> m.Peer:
        return out(m.Peer, await b.pair(body.address, body.token))

    @r.delete("/pairing/{site_id}", tags=["sites"], status_code=204, summary="Unpair a site")
    async def unpair(site_id: NamePath) -> Response:
        await b.unpair(site_id)
        return Response(status_code=204)

    @r.get("/vms", tags=["vms"], summary="VMs by name, paged", response_model=m.Page[m.Vm])
    async def list_vms(
        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 1000,
        after: Annotated[str | None, Query(max_length=128, description="cursor")] = None,
    ) -> Response:
        vms = await b.list_vms(limit + 1, after)
        more = len(vms) > limit
        vms = vms[:limit]
        return page_response(VMS_JSON, vms, vms[-1].name if more else None)

    @r.post("/vms", tags=["vms"], status_code=201, summary="Add a VM and its volumes")
    async def create_vm(body: m.VmCreate, response: Response) -> m.Vm:
        vm = await b.create_vm(body.name, [await _spec(v) for v in body.volumes])
        response.headers["Location"] = f"{PREFIX}/vms/{vm.name}"
        return out(m.Vm, vm)

    @r.get("/vms/{name}", tags=["vms"], summary="One VM")
    async def get_vm(name: NamePath) -> m.Vm:
        return out(m.Vm, await b.get_vm(name))

    @r.delete("/vms/{name}", tags=["vms"], status_code=204, summary="Remove a VM")
    async def delete_vm(name: NamePath) -> Response:
        await b.delete_vm(name)
        return Response(status_code=204)

    @r.get("/volumes", tags=["volumes"], summary="Every volume (of one VM)")
    async def list_volumes(
        vm: Annotated[str | None, Query(max_length=128)] = None,
    ) -> list[m.Volume]:
        return outs(m.Volume, await b.list_volumes(vm))

    @r.get("/vms/{vm}/volumes", tags=["volumes"], summary="The volumes of a VM")
    async def list_vm_volumes(vm: NamePath) -> list[m.Volume]:
        return outs(m.Volume, await b.list_volumes(vm))

    @r.post("/vms/{vm}/volumes", tags=["volumes"], status_code=201, summary="Add a volume")
    async def create_volume(vm: NamePath, body: m.VolumeSpec) -> m.Volume:
        return out(m.Volume, await b.create_volume(vm, await _spec(body)))

    @r.get("/vms/{vm}/volumes/{name}", tags=["volumes"], summary="One volume")
    async def get_volume(vm: NamePath, name: NamePath) -> m.Volume:
        return out(m.Volume, await b.get_volume(vm, name))

    @r.delete(
        "/vms/{vm}/volumes/{name}", tags=["volumes"], status_code=204, summary="Remove a volume"
    )
    async def delete_volume(vm: NamePath, name: NamePath) -> Response:
        await b.delete_volume(vm, name)
        return Response(status_code=204)

    return r
