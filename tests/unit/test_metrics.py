"""Metrics from a status snapshot, served over real HTTP by MetricsServer."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics, MetricsServer


def snapshot() -> dict[str, Any]:
    return {
        "sources": {"web": {"counters": {"lines": 10, "matched": 6, "unmatched": 2, "filtered": 1,
                                         "empty": 1, "invalid_encoding": 1, "truncated": 0},
                            "files": 2, "lag": 512}},
        "databases": {"log_web": {"stored": 7, "conflicts": 1, "dead_lettered": 0, "spooled": 3,
                                  "failures": 2, "queued": 4, "spool_records": 3,
                                  "spool_bytes": 900, "healthy": False}},
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_snapshot_becomes_metrics() -> None:
    metrics = Metrics(snapshot)
    metrics.observe_request("log_web", 0.03)
    got = samples(metrics.exposition().decode())
    web, db = (("source", "web"),), (("database", "log_web"),)
    assert got[("couchlog_source_lines_read_total", web)] == 10
    assert got[("couchlog_source_lines_kept_total", web)] == 8
    assert got[("couchlog_source_lines_filtered_total", web)] == 2
    assert got[("couchlog_source_lines_unmatched_total", web)] == 2
    assert got[("couchlog_source_lines_invalid_total", web)] == 1
    assert got[("couchlog_source_bytes_behind", web)] == 512
    assert got[("couchlog_files_followed", web)] == 2
    assert got[("couchlog_database_docs_stored_total", db)] == 7
    assert got[("couchlog_database_docs_spooled_total", db)] == 3
    assert got[("couchlog_database_request_failures_total", db)] == 2
    assert got[("couchlog_database_queue_depth", db)] == 4
    assert got[("couchlog_database_spool_bytes", db)] == 900
    assert got[("couchlog_database_up", db)] == 0
    assert got[("couchlog_request_seconds_count", db)] == 1
    assert any(name.startswith("process_") for name, _ in got)


async def test_server_answers_metrics_and_health() -> None:
    healthy = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, Metrics(snapshot),
                           lambda: (healthy["ok"], {"health": "OK" if healthy["ok"] else "x"}))
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                assert "couchlog_source_lines_read_total" in await r.text()
            async with session.get(base + "/health") as r:
                assert r.status == 200 and (await r.json())["health"] == "OK"
            healthy["ok"] = False
            async with session.get(base + "/health") as r:
                assert r.status == 503
    finally:
        await server.stop()
