"""The API client the site-service tests use: an httpx client over the ASGI app with the
admin token, the database and the backend behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from zcore.site.api import DbSiteBackend
from zcore.site.db import SiteDB


@dataclass
class Api:
    client: httpx.AsyncClient
    db: SiteDB
    backend: DbSiteBackend
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        """`method` on `path` with the admin token (plus `headers`)."""
        return await self.client.request(
            method, path, headers={**self.auth, **(headers or {})}, **kw
        )

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("POST", path, **kw)

    async def patch(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kw)

    async def delete(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kw)
