"""A pipeline whose CouchDB traffic goes through tests/faultproxy.py, and what the delivery and
`agent status` suites both do with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.harness import Pipeline


def through(proxy: FaultProxy, couchdb_url: str) -> str:
    """`couchdb_url` with its credentials, pointed at the proxy."""
    parts = urlsplit(couchdb_url)
    auth = f"{parts.username}:{parts.password}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{proxy.port}", parts.path, "", ""))


def flow_via(proxy: FaultProxy, tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
             logs: Path, **main: object) -> Pipeline:
    settings: dict[str, object] = {"couchdb": {"request_timeout": "1s"},
                                   "shipping": {"batch_max_docs": 300, "retry_max_backoff": "500ms"}}
    for key, value in main.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value  # type: ignore[dict-item]
    return Pipeline(tmp_path, couch, through(proxy, couchdb_url), database,
                    [{"name": "app", "paths": [str(logs / "app.log*")], "exclude_paths": ["*.gz"]}],
                    **settings)


def failover_flow(proxy: FaultProxy, tmp_path: Path, couch: CouchDB, couchdb_url: str,
                  database: str, logs: Path, failback_after: str) -> Pipeline:
    """logs/app.log shipped to two URLs: first through the proxy, then straight to the server."""
    first = through(proxy, couchdb_url)
    return Pipeline(tmp_path, couch, first, database,
                    [{"name": "app", "paths": [str(logs / "app.log")]}],
                    couchdb={"url": [first, couchdb_url], "request_timeout": "1s",
                             "failback_after": failback_after})


def refuse_secrets(couch: CouchDB, database: str) -> None:
    """A validate_doc_update that refuses (forbidden) every document whose msg starts 'secret'."""
    status, body = couch.request("PUT", f"/{database}/_design/guard", {
        "validate_doc_update": "function (doc) { if (doc.msg && doc.msg.indexOf('secret') === 0) "
                               "{ throw({forbidden: 'no secrets here'}); } }"})
    assert status in (201, 202), body


def agent_status(flow: Pipeline, *args: str) -> tuple[int, str]:
    """`agent status` of the flow's agent: the exit code and what it printed."""
    result = subprocess.run([sys.executable, "-m", "agent", "status", "-c", str(flow.config), *args],
                            capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout


def spooled_bytes(flow: Pipeline) -> int:
    folder = flow.config.parent / "state" / "spool"
    return sum(p.stat().st_size for p in folder.rglob("*.seg")) if folder.exists() else 0
