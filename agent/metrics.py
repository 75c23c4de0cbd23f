"""Prometheus metrics and a health endpoint, served on an opt-in `metrics.listen` address.

The exposition format is prometheus_client's, not hand-written. Values are read
at scrape time from the same snapshot `agent status` shows (a custom collector),
so the per-line path counts nothing twice; only request latency, which no
snapshot keeps, is observed as it happens. Each `Agent` owns its own registry:
no module-level state, and tests can run agents side by side. Counters are
process counters: they start from zero at every start, as Prometheus expects
(its `rate()` handles the reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

Snapshot = Callable[[], dict[str, Any]]

SOURCE_COUNTERS = {
    # metric suffix: (help, the counters that add up to it)
    "lines_read": ("lines read from the source's files", ("lines",)),
    "lines_kept": ("lines kept as documents (parsed, or raw with parse_error)",
                   ("matched", "unmatched")),
    "lines_filtered": ("lines dropped by include/exclude or empty", ("filtered", "empty")),
    "lines_unmatched": ("lines that did not match the source's parser", ("unmatched",)),
    "lines_invalid": ("lines with invalid UTF-8 (shipped with replacement characters)",
                      ("invalid_encoding",)),
    "lines_truncated": ("lines cut at max_line_bytes", ("truncated",)),
}
DATABASE_COUNTERS = {
    "docs_stored": ("documents CouchDB stored", "stored"),
    "docs_conflicts": ("documents CouchDB already had (a re-send: counts as delivered)",
                       "conflicts"),
    "docs_dead_lettered": ("documents CouchDB refused for good, kept in the dead-letter file",
                           "dead_lettered"),
    "docs_spooled": ("documents written to the disk spool", "spooled"),
    "request_failures": ("_bulk_docs requests that failed", "failures"),
}


class AgentCollector(Collector):
    """Turns a status snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        sources: dict[str, Any] = snap.get("sources", {})
        for suffix, (text, fields) in SOURCE_COUNTERS.items():
            family = CounterMetricFamily(f"couchlog_source_{suffix}", text, labels=["source"])
            for name, source in sources.items():
                counters = source.get("counters", {})
                family.add_metric([name], sum(counters.get(f, 0) for f in fields))
            yield family
        behind = GaugeMetricFamily("couchlog_source_bytes_behind",
                                   "bytes in followed files not yet committed", labels=["source"])
        files = GaugeMetricFamily("couchlog_files_followed", "files followed", labels=["source"])
        for name, source in sources.items():
            behind.add_metric([name], source.get("lag", 0))
            files.add_metric([name], source.get("files", 0))
        yield behind
        yield files
        databases: dict[str, Any] = snap.get("databases", {})
        for suffix, (text, field) in DATABASE_COUNTERS.items():
            family = CounterMetricFamily(f"couchlog_database_{suffix}", text, labels=["database"])
            for name, db in databases.items():
                family.add_metric([name], db.get(field, 0))
            yield family
        gauges = {
            "queue_depth": ("documents queued in memory", "queued"),
            "spool_documents": ("documents waiting in the disk spool", "spool_records"),
            "spool_bytes": ("bytes in the disk spool", "spool_bytes"),
        }
        for suffix, (text, field) in gauges.items():
            gauge = GaugeMetricFamily(f"couchlog_database_{suffix}", text, labels=["database"])
            for name, db in databases.items():
                gauge.add_metric([name], db.get(field, 0))
            yield gauge
        healthy = GaugeMetricFamily("couchlog_database_up",
                                    "1 while CouchDB takes this database's documents",
                                    labels=["database"])
        for name, db in databases.items():
            healthy.add_metric([name], 1 if db.get("healthy") else 0)
        yield healthy


class Metrics:
    """One agent's registry: the snapshot collector, process metrics and request latency."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(snapshot))
        ProcessCollector(registry=self.registry)
        self.request_seconds = Histogram(
            "couchlog_request_seconds", "_bulk_docs request latency", ["database"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def observe_request(self, database: str, seconds: float) -> None:
        self.request_seconds.labels(database).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Health = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """`/metrics` (Prometheus text format) and `/health` (200 healthy, 503 not, with the status
    JSON) on one address; started and stopped by the `Agent`."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Health) -> None:
        self.host, self.port = host, port
        self.metrics = metrics
        self.health = health
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        """Bind now, so that a taken port is a startup failure with a clear message."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server  # the OS chose the port: read it back for tests
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _: web.Request) -> web.Response:
        ok, snapshot = self.health()
        return web.Response(status=200 if ok else 503, body=orjson.dumps(snapshot),
                            content_type="application/json")
