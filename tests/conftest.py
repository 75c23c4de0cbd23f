"""Fixtures: the CouchDB-API server (COUCHDB_URL, or pouchdb-server started here) and databases."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import PouchDBServer  # noqa: E402
from tests.couch import CouchDB  # noqa: E402

REALLOGS = ROOT.parent / "shared" / "data" / "reallogs"


@pytest.fixture(scope="session")
def couchdb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin URL of a server speaking CouchDB's HTTP API."""
    url = os.environ.get("COUCHDB_URL")
    if url:
        yield url.rstrip("/")
        return
    with PouchDBServer(tmp_path_factory.mktemp("pouchdb")) as server:
        yield server.url


@pytest.fixture(scope="session")
def couch(couchdb_url: str) -> CouchDB:
    return CouchDB(couchdb_url)


@pytest.fixture
def database(couch: CouchDB) -> Iterator[str]:
    """A fresh, empty database, deleted afterwards."""
    name = f"log_test_{uuid.uuid4().hex[:12]}"
    couch.create_db(name)
    yield name
    couch.delete_db(name)


@pytest.fixture(scope="session")
def reallogs() -> Path:
    if not REALLOGS.is_dir():
        pytest.skip(f"real log samples not found at {REALLOGS}")
    return REALLOGS


@pytest.fixture(autouse=True)
def no_stray_agents() -> Iterator[None]:
    """Kill any `agent run` this test started and left running (a failed assertion, say)."""
    yield
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"agent\x00run" in cmdline:
            os.kill(int(entry.name), signal.SIGKILL)
