"""The site's inventory in its database: VMs, their volumes, VPGs and their members.

Sits under zcore.site.db.repo.SiteDB (a mixin of it).  Definitions and roles only: what a
volume holds lives in its journal and bitmap, never here.  Every method blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from zcore.site.db import schema as t
from zcore.site.db.base import Repository, clamp_limit, now
from zcore.site.db.records import (
    VmRecord,
    VolumeRecord,
    VolumeRole,
    VpgRecord,
    VpgRole,
    VpgState,
)
from zcore.site.errors import (
    AlreadyExistsError,
    InUseError,
    PeerNotFoundError,
    VmNotFoundError,
    VolumeNotFoundError,
    VpgNotFoundError,
)

SHOW_NAMES = 20  # how many existing names a not-found error lists


def _volume(row: sa.Row[Any], vm: str) -> VolumeRecord:
    return VolumeRecord(
        row.id, vm, row.name, row.size, row.path, VolumeRole(row.role), row.created_at
    )


class InventoryRepository(Repository):
    # -- VMs -------------------------------------------------------------------------------

    def _vm_id(self, conn: sa.Connection, name: str) -> int:
        vm_id = conn.scalar(sa.select(t.vms.c.id).where(t.vms.c.name == name))
        if vm_id is None:
            names = conn.scalars(sa.select(t.vms.c.name).order_by(t.vms.c.name).limit(SHOW_NAMES))
            raise VmNotFoundError(f"no VM named {name!r}", {"known": list(names)})
        return int(vm_id)

    def create_vm(self, name: str, volumes: Iterable[Mapping[str, Any]] = ()) -> VmRecord:
        """Add a VM and its volumes (mappings of name, size, path, role).  Blocks."""
        created = now()
        with self._write(f"VM {name!r}") as conn:
            if conn.scalar(sa.select(t.vms.c.id).where(t.vms.c.name == name)) is not None:
                raise AlreadyExistsError(f"a VM named {name!r} already exists")
            vm_id = conn.execute(
                sa.insert(t.vms).values(name=name, created_at=created).returning(t.vms.c.id)
            ).scalar_one()
            for vol in volumes:
                self._insert_volume(conn, vm_id, name, vol, created)
        return self.get_vm(name)

    def get_vm(self, name: str) -> VmRecord:
        """The VM `name` with its volumes; VmNotFoundError lists some that exist.  Blocks."""
        with self._engine.connect() as conn:
            vm_id = self._vm_id(conn, name)
            row = conn.execute(sa.select(t.vms).where(t.vms.c.id == vm_id)).one()
            vols = conn.execute(
                sa.select(t.volumes).where(t.volumes.c.vm_id == vm_id).order_by(t.volumes.c.name)
            )
            return VmRecord(row.id, row.name, row.created_at, tuple(_volume(v, name) for v in vols))

    def list_vms(self, limit: int | None = None, after: str | None = None) -> list[VmRecord]:
        """VMs by name (those after `after`, at most `limit`), each with its volumes: two
        queries whatever the count (the second over the page's name range).  Blocks."""
        query = sa.select(t.vms).order_by(t.vms.c.name).limit(clamp_limit(limit))
        if after is not None:
            query = query.where(t.vms.c.name > after)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            if not rows:
                return []
            vol_query = (
                sa.select(t.volumes)
                .join(t.vms, t.vms.c.id == t.volumes.c.vm_id)
                .where(t.vms.c.name >= rows[0].name, t.vms.c.name <= rows[-1].name)
                .order_by(t.volumes.c.vm_id, t.volumes.c.name)
            )
            by_vm: dict[int, list[VolumeRecord]] = {r.id: [] for r in rows}
            names = {r.id: r.name for r in rows}
            for v in conn.execute(vol_query):
                vols = by_vm.get(v.vm_id)
                if vols is not None:
                    vols.append(_volume(v, names[v.vm_id]))
        return [VmRecord(r.id, r.name, r.created_at, tuple(by_vm[r.id])) for r in rows]

    def count_vms(self) -> int:
        """How many VMs the site holds.  Blocks."""
        with self._engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(t.vms)) or 0)

    def delete_vm(self, name: str) -> None:
        """Remove a VM and its volumes; InUseError while a VPG holds it.  Blocks."""
        with self._write(f"VM {name!r}") as conn:
            vm_id = self._vm_id(conn, name)
            vpgs = list(
                conn.scalars(
                    sa.select(t.vpgs.c.name)
                    .join(t.vpg_members, t.vpg_members.c.vpg_id == t.vpgs.c.id)
                    .where(t.vpg_members.c.vm_id == vm_id)
                )
            )
            if vpgs:
                raise InUseError(f"VM {name!r} is protected by VPG {vpgs[0]!r}", {"vpgs": vpgs})
            conn.execute(sa.delete(t.volumes).where(t.volumes.c.vm_id == vm_id))
            conn.execute(sa.delete(t.vms).where(t.vms.c.id == vm_id))

    # -- volumes ---------------------------------------------------------------------------

    @staticmethod
    def _insert_volume(
        conn: sa.Connection, vm_id: int, vm: str, vol: Mapping[str, Any], created: float
    ) -> None:
        exists = conn.scalar(
            sa.select(t.volumes.c.id).where(
                t.volumes.c.vm_id == vm_id, t.volumes.c.name == vol["name"]
            )
        )
        if exists is not None:
            raise AlreadyExistsError(f"VM {vm!r} already has a volume {vol['name']!r}")
        conn.execute(
            sa.insert(t.volumes).values(
                vm_id=vm_id,
                name=vol["name"],
                size=int(vol["size"]),
                path=vol.get("path"),
                role=str(VolumeRole(vol.get("role", VolumeRole.PROTECTED))),
                created_at=created,
            )
        )

    def create_volume(
        self,
        vm: str,
        name: str,
        size: int,
        path: str | None = None,
        role: VolumeRole = VolumeRole.PROTECTED,
    ) -> VolumeRecord:
        """Add a volume to VM `vm`.  Blocks."""
        spec = {"name": name, "size": size, "path": path, "role": role}
        with self._write(f"volume {vm}/{name}") as conn:
            self._insert_volume(conn, self._vm_id(conn, vm), vm, spec, now())
        return self.get_volume(vm, name)

    def get_volume(self, vm: str, name: str) -> VolumeRecord:
        """One volume; VolumeNotFoundError lists the VM's volumes.  Blocks."""
        with self._engine.connect() as conn:
            vm_id = self._vm_id(conn, vm)
            rows = conn.execute(
                sa.select(t.volumes).where(t.volumes.c.vm_id == vm_id).order_by(t.volumes.c.name)
            ).all()
        for row in rows:
            if row.name == name:
                return _volume(row, vm)
        raise VolumeNotFoundError(
            f"VM {vm!r} has no volume {name!r}", {"known": [r.name for r in rows]}
        )

    def list_volumes(self, vm: str | None = None) -> list[VolumeRecord]:
        """Every volume (of one VM if `vm` is given), by VM and name.  Blocks."""
        query = (
            sa.select(t.volumes, t.vms.c.name.label("vm_name"))
            .join(t.vms, t.vms.c.id == t.volumes.c.vm_id)
            .order_by(t.vms.c.name, t.volumes.c.name)
        )
        with self._engine.connect() as conn:
            if vm is not None:
                query = query.where(t.volumes.c.vm_id == self._vm_id(conn, vm))
            return [_volume(r, r.vm_name) for r in conn.execute(query)]

    def delete_volume(self, vm: str, name: str) -> None:
        """Remove one volume from its VM.  Blocks."""
        self.get_volume(vm, name)
        with self._write(f"volume {vm}/{name}") as conn:
            conn.execute(
                sa.delete(t.volumes).where(
                    t.volumes.c.vm_id == self._vm_id(conn, vm), t.volumes.c.name == name
                )
            )

    # -- VPGs ------------------------------------------------------------------------------

    def _vpg_row(self, conn: sa.Connection, name: str) -> sa.Row[Any]:
        row = conn.execute(sa.select(t.vpgs).where(t.vpgs.c.name == name)).first()
        if row is None:
            names = conn.scalars(sa.select(t.vpgs.c.name).order_by(t.vpgs.c.name).limit(SHOW_NAMES))
            raise VpgNotFoundError(f"no VPG named {name!r}", {"known": list(names)})
        return row

    @staticmethod
    def _vpg(conn: sa.Connection, row: sa.Row[Any]) -> VpgRecord:
        members = conn.scalars(
            sa.select(t.vms.c.name)
            .join(t.vpg_members, t.vpg_members.c.vm_id == t.vms.c.id)
            .where(t.vpg_members.c.vpg_id == row.id)
            .order_by(t.vms.c.name)
        )
        return VpgRecord(
            row.id,
            row.name,
            VpgRole(row.role),
            row.peer_site_id,
            dict(row.settings),
            VpgState(row.state),
            row.created_at,
            row.updated_at,
            tuple(members),
        )

    def create_vpg(
        self,
        name: str,
        role: VpgRole,
        vms: Sequence[str] = (),
        peer: str | None = None,
        settings: Mapping[str, Any] | None = None,
        state: VpgState = VpgState.CREATING,
    ) -> VpgRecord:
        """Define a VPG over existing VMs (and an existing peer, if given).  Blocks."""
        created = now()
        with self._write(f"VPG {name!r}") as conn:
            if conn.scalar(sa.select(t.vpgs.c.id).where(t.vpgs.c.name == name)) is not None:
                raise AlreadyExistsError(f"a VPG named {name!r} already exists")
            if (
                peer is not None
                and conn.scalar(sa.select(t.peers.c.site_id).where(t.peers.c.site_id == peer))
                is None
            ):
                raise PeerNotFoundError(f"no paired site {peer!r}")
            vm_ids = [self._vm_id(conn, vm) for vm in dict.fromkeys(vms)]
            vpg_id = conn.execute(
                sa.insert(t.vpgs)
                .values(
                    name=name,
                    role=str(VpgRole(role)),
                    peer_site_id=peer,
                    settings=dict(settings or {}),
                    state=str(VpgState(state)),
                    created_at=created,
                    updated_at=created,
                )
                .returning(t.vpgs.c.id)
            ).scalar_one()
            if vm_ids:
                conn.execute(
                    sa.insert(t.vpg_members), [{"vpg_id": vpg_id, "vm_id": i} for i in vm_ids]
                )
        return self.get_vpg(name)

    def get_vpg(self, name: str) -> VpgRecord:
        """The VPG `name` with its member VMs; VpgNotFoundError lists some that exist.
        Blocks."""
        with self._engine.connect() as conn:
            return self._vpg(conn, self._vpg_row(conn, name))

    def list_vpgs(self, role: VpgRole | None = None) -> list[VpgRecord]:
        """Every VPG by name (of one role if given).  Blocks."""
        query = sa.select(t.vpgs).order_by(t.vpgs.c.name)
        if role is not None:
            query = query.where(t.vpgs.c.role == str(role))
        with self._engine.connect() as conn:
            return [self._vpg(conn, row) for row in conn.execute(query).all()]

    def update_vpg(
        self,
        name: str,
        *,
        settings: Mapping[str, Any] | None = None,
        state: VpgState | None = None,
        role: VpgRole | None = None,
    ) -> VpgRecord:
        """Replace a VPG's settings and/or set its state or role.  Blocks."""
        values: dict[str, Any] = {"updated_at": now()}
        if settings is not None:
            values["settings"] = dict(settings)
        if state is not None:
            values["state"] = str(VpgState(state))
        if role is not None:
            values["role"] = str(VpgRole(role))
        with self._write(f"VPG {name!r}") as conn:
            row = self._vpg_row(conn, name)
            conn.execute(sa.update(t.vpgs).where(t.vpgs.c.id == row.id).values(**values))
        return self.get_vpg(name)

    def delete_vpg(self, name: str) -> None:
        """Remove a VPG definition (its VMs stay).  Blocks."""
        with self._write(f"VPG {name!r}") as conn:
            row = self._vpg_row(conn, name)
            conn.execute(sa.delete(t.vpg_members).where(t.vpg_members.c.vpg_id == row.id))
            conn.execute(sa.delete(t.vpgs).where(t.vpgs.c.id == row.id))
