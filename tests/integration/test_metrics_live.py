"""`metrics.listen` on the real agent: /metrics against what was written and stored, bytes behind
while CouchDB is down, /health codes, and a port that cannot be bound."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.harness import append, numbered

pytestmark = pytest.mark.integration


def through(proxy: FaultProxy, couchdb_url: str) -> str:
    parts = urlsplit(couchdb_url)
    auth = f"{parts.username}:{parts.password}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{proxy.port}", parts.path, "", ""))


def metrics_address(agent: AgentProcess) -> str:
    """Where the agent listens (it was told port 0): its `agent_started` event says."""
    for line in agent.log().splitlines():
        if '"agent_started"' in line:
            return f"http://{json.loads(line)['metrics']}"
    raise AssertionError("no agent_started event")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(base + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(base: str, name: str, **labels: str) -> float:
    return scrape(base).get((name, tuple(sorted(labels.items()))), -1.0)


def wait_behind(base: str, expected: int) -> None:
    seen: list[float] = []

    def reached() -> bool:
        seen.append(value(base, "couchlog_source_bytes_behind", source="app"))
        return seen[-1] == expected

    try:
        wait_for(reached, 60, f"{expected} bytes behind")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; saw {sorted(set(seen))}") from None


def messages(couch: CouchDB, database: str) -> Counter[str]:
    return Counter(str(doc["msg"]) for doc in couch.docs(database))


def config_for(tmp_path: Path, url: str, database: str, **main: Any) -> Path:
    return write_config(tmp_path / "etc", url, [
        {"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
         "schema": "$msg..."}], **{"metrics": {"listen": "127.0.0.1:0"}, **main})


def test_counters_say_what_was_written_and_stored(tmp_path: Path, couch: CouchDB, couchdb_url: str,
                                                  database: str) -> None:
    with AgentProcess(config_for(tmp_path, couchdb_url, database)) as agent:
        agent.wait_started()
        base = metrics_address(agent)
        expected = append(tmp_path / "app.log", numbered("app", 0, 250))
        n = sum(expected.values())
        wait_for(lambda: value(base, "couchlog_database_docs_stored_total",
                               database=database) == n, 60, "docs stored in the metrics")
        assert messages(couch, database) == expected
        got = scrape(base)
        app, db = (("source", "app"),), (("database", database),)
        assert got[("couchlog_source_lines_read_total", app)] == n
        assert got[("couchlog_source_lines_kept_total", app)] == n
        assert got[("couchlog_source_lines_filtered_total", app)] == 0
        assert got[("couchlog_files_followed", app)] == 1
        assert got[("couchlog_source_bytes_behind", app)] == 0
        assert got[("couchlog_database_docs_conflicts_total", db)] == 0
        assert got[("couchlog_database_up", db)] == 1
        # Every _bulk_docs request the shipper sent was timed, and took some time.
        requests = got[("couchlog_request_seconds_count", db)]
        assert requests >= 1 and got[("couchlog_request_seconds_sum", db)] > 0
        assert got[("couchlog_request_seconds_bucket", (*db, ("le", "+Inf")))] == requests
        assert any(name.startswith("process_") for name, _ in got)
        status, body = get(base + "/health")
        assert status == 200 and json.loads(body)["health"] == "OK"
        assert agent.stop() == 0


def test_bytes_behind_grow_by_what_was_appended_while_couchdb_is_down(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log_path = tmp_path / "app.log"
    state = tmp_path / "etc" / "state"

    def committed() -> int:
        files = json.loads((state / "offsets.json").read_text())["files"]
        return sum(f["offset"] for f in files.values())

    def paused() -> bool:
        db = json.loads((state / "status.json").read_text())["databases"][database]
        return bool(db["backpressure"]) and db["queued"] >= 5

    with FaultProxy(couchdb_url) as proxy:
        # A tiny spool and queue are full at once: reading pauses, and what is read stays
        # uncommitted.
        config = config_for(tmp_path, through(proxy, couchdb_url), database,
                            spool={"max_bytes": 1, "segment_bytes": 1},
                            shipping={"queue_max_docs": 5, "batch_max_docs": 5})
        with AgentProcess(config) as agent:
            agent.wait_started()
            base = metrics_address(agent)
            expected = append(log_path, numbered("up", 0, 20))
            wait_for(lambda: messages(couch, database) == expected, 60, "the first documents")
            assert get(base + "/health")[0] == 200
            proxy.set("reset")
            expected += append(log_path, numbered("fill", 0, 30))
            wait_for(paused, 60, "reading to pause (spool and queue full)")
            # Behind is the file past its committed offset, as the agent saves it.
            wait_for(lambda: value(base, "couchlog_source_bytes_behind", source="app")
                     == log_path.stat().st_size - committed(), 60, "the bytes behind")
            at = committed()
            behind = log_path.stat().st_size - at
            for n, count in enumerate((7, 40)):
                before = log_path.stat().st_size
                expected += append(log_path, numbered(f"down{n}", 0, count))
                behind += log_path.stat().st_size - before
                wait_behind(base, behind)
            assert committed() == at
            status, body = get(base + "/health")
            assert status == 503, body
            assert json.loads(body)["health"] in ("WARNING", "CRITICAL")
            proxy.set("pass")
            wait_for(lambda: messages(couch, database) == expected, 60, "every document")
            wait_behind(base, 0)
            wait_for(lambda: get(base + "/health")[0] == 200, 60, "/health 200 again")
            assert agent.stop() == 0
    assert messages(couch, database) == expected


def test_a_metrics_port_in_use_fails_the_start_naming_it(tmp_path: Path, couchdb_url: str,
                                                         database: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_for(tmp_path, couchdb_url, database,
                            metrics={"listen": f"127.0.0.1:{port}"})
        agent = AgentProcess(config).start()
        assert agent.process is not None
        assert agent.process.wait(timeout=60) == 3
    failed = [json.loads(line) for line in agent.log().splitlines() if '"agent_failed"' in line]
    assert len(failed) == 1
    assert f"metrics.listen 127.0.0.1:{port}" in failed[0]["error"]
    assert "Traceback" not in agent.log()
