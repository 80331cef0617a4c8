"""Prometheus metrics of a running site, at `GET /metrics` (prometheus_client's text format).

Sits beside the REST API: the route is added to the API's application, so the API's gate
applies and a scrape needs the API token (Prometheus: `authorization: {credentials: ...}`
in the scrape config).  The figures are the scheduler's last sample (zcore.site.scheduler,
every 5 s) plus the NBD server's connection count: a scrape never waits on a VPG's lock
or a journal.

    zcore_vpg_rpo_seconds{vpg,role}            RPO (recovery site: the newest usable
                                               checkpoint's age when no better figure)
    zcore_vpg_throughput_bytes{vpg,role,direction}  bytes per second, in or out
    zcore_vpg_journal_bytes{vpg}               journal bytes at the recovery site
    zcore_vpg_history_seconds{vpg}             history held at the recovery site
    zcore_vpg_sync_progress{vpg}               0..1 while a sync runs
    zcore_vpg_bitmap_mode{vpg}                 1 while the VPG tracks writes in bitmaps
    zcore_vpg_rpo_alert{vpg}                   1 while the RPO is above its SLA
    zcore_nbd_connections                      open NBD client connections
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from zcore.site.runtime import SiteRuntime
from zcore.site.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SiteCollector(Collector):
    def __init__(self, runtime: SiteRuntime, scheduler: Scheduler) -> None:
        self.rt = runtime
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        rpo = GaugeMetricFamily("zcore_vpg_rpo_seconds", "recovery point objective",
                                labels=["vpg", "role"])
        rate = GaugeMetricFamily("zcore_vpg_throughput_bytes", "bytes per second",
                                 labels=["vpg", "role", "direction"])
        journal = GaugeMetricFamily("zcore_vpg_journal_bytes", "journal bytes", labels=["vpg"])
        history = GaugeMetricFamily("zcore_vpg_history_seconds", "history held",
                                    labels=["vpg"])
        sync = GaugeMetricFamily("zcore_vpg_sync_progress", "sync progress 0..1",
                                 labels=["vpg"])
        bitmap = GaugeMetricFamily("zcore_vpg_bitmap_mode", "1 in bitmap mode", labels=["vpg"])
        alert = GaugeMetricFamily("zcore_vpg_rpo_alert", "1 while the RPO misses its SLA",
                                  labels=["vpg"])
        for s in self.scheduler.last.values():
            if s.rpo_seconds is not None:
                rpo.add_metric([s.vpg, s.role], s.rpo_seconds)
            if s.throughput_in is not None:
                rate.add_metric([s.vpg, s.role, "in"], s.throughput_in)
            if s.throughput_out is not None:
                rate.add_metric([s.vpg, s.role, "out"], s.throughput_out)
            if s.journal_bytes is not None:
                journal.add_metric([s.vpg], s.journal_bytes)
            if s.history_seconds is not None:
                history.add_metric([s.vpg], s.history_seconds)
            if s.sync_progress is not None:
                sync.add_metric([s.vpg], s.sync_progress)
            if s.role == "protected":
                bitmap.add_metric([s.vpg], 1.0 if s.bitmap_mode else 0.0)
                alert.add_metric([s.vpg], 1.0 if s.rpo_alert else 0.0)
        nbd = GaugeMetricFamily("zcore_nbd_connections", "open NBD connections",
                                value=self.rt.nbd.connections)
        yield from (rpo, rate, journal, history, sync, bitmap, alert, nbd)


def install_metrics(app: FastAPI, runtime: SiteRuntime, scheduler: Scheduler) -> None:
    """Add `GET /metrics` to the API application (behind its token check)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(runtime, scheduler))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
