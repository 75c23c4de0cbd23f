"""Fleet documents: one per host, updated in place, and refused for another agent user's host."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

from agent.couchdb import basic_auth
from agent.fleet import DESIGN, FleetWriter, fleet_document, stale_hosts
from tests.couch import CouchDB

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet_db(couch: CouchDB) -> Iterator[str]:
    name = f"couchlog_fleet_{uuid.uuid4().hex[:8]}"
    couch.create_db(name)
    status, body = couch.request("PUT", f"/{name}/_design/couchlog_fleet", DESIGN)
    assert status in (201, 202), body
    yield name
    couch.delete_db(name)


@pytest.fixture
def agent_users(couch: CouchDB) -> Iterator[dict[str, str]]:
    users = {f"agent-{uuid.uuid4().hex[:6]}": uuid.uuid4().hex for _ in range(2)}
    couch.create_db("_users")
    for name, password in users.items():
        status, body = couch.request("PUT", f"/_users/org.couchdb.user:{name}", {
            "_id": f"org.couchdb.user:{name}", "name": name, "password": password,
            "type": "user", "roles": ["couchlog_agent"]})
        assert status in (201, 202), body
    yield users
    for name in users:
        status, doc = couch.request("GET", f"/_users/org.couchdb.user:{name}")
        if status == 200:
            couch.request("DELETE", f"/_users/org.couchdb.user:{name}?rev={doc['_rev']}")


SNAPSHOT = {"pid": 1, "started_at": 1000.0,
            "sources": {"web": {"counters": {"lines": 5}, "files": 1, "lag": 10}},
            "databases": {"log_web": {"stored": 5, "spool_records": 0, "spool_bytes": 0,
                                      "last_success": 1005.0}}}


async def test_each_agent_writes_only_its_own_host(couch: CouchDB, fleet_db: str,
                                                   agent_users: dict[str, str]) -> None:
    (alice, alice_pw), (bob, bob_pw) = agent_users.items()
    async with aiohttp.ClientSession() as session:
        a = FleetWriter(session, [(couch.base, basic_auth(alice, alice_pw))], 10, fleet_db)
        b = FleetWriter(session, [(couch.base, basic_auth(bob, bob_pw))], 10, fleet_db)
        assert await a.write(fleet_document(SNAPSHOT, "alpha", alice, "OK", "start")) is None
        assert await a.write(fleet_document(SNAPSHOT, "alpha", alice, "WARNING", "tick")) is None
        # A new writer for the same host (the agent restarted) picks up the current revision.
        again = FleetWriter(session, [(couch.base, basic_auth(alice, alice_pw))], 10, fleet_db)
        assert await again.write(fleet_document(SNAPSHOT, "alpha", alice, "OK", "stop")) is None
        assert await b.write(fleet_document(SNAPSHOT, "beta", bob, "OK", "start")) is None
        stolen = await b.write(fleet_document(SNAPSHOT, "alpha", bob, "OK", "tick"))
        assert stolen is not None and "403" in stolen
    docs = {d["_id"]: d for d in couch.docs(fleet_db)}
    assert sorted(docs) == ["host:alpha", "host:beta"]
    assert docs["host:alpha"]["agent_user"] == alice and docs["host:alpha"]["event"] == "stop"
    assert docs["host:alpha"]["_rev"].startswith("3-")
    assert docs["host:beta"]["bytes_behind"] == 10


def test_another_user_cannot_overwrite_with_new_edits_false(couch: CouchDB, fleet_db: str,
                                                            agent_users: dict[str, str]) -> None:
    (alice, alice_pw), (bob, bob_pw) = agent_users.items()
    owner = CouchDB(couch.base.replace("://", f"://{alice}:{alice_pw}@"))
    status, _ = owner.request("PUT", f"/{fleet_db}/host:alpha",
                              fleet_document(SNAPSHOT, "alpha", alice, "OK", "start"))
    assert status in (201, 202)
    attacker = CouchDB(couch.base.replace("://", f"://{bob}:{bob_pw}@"))
    forged = {**fleet_document(SNAPSHOT, "alpha", bob, "OK", "tick"), "_rev": "1-" + "f" * 32}
    status, body = attacker.request("POST", f"/{fleet_db}/_bulk_docs",
                                    {"new_edits": False, "docs": [forged]})
    refused = status in (401, 403) or (isinstance(body, list) and body and
                                       body[0].get("error") in ("forbidden", "unauthorized"))
    assert refused, (status, body)
    _, stored = couch.request("GET", f"/{fleet_db}/host:alpha")
    assert stored["agent_user"] == alice


def test_quiet_hosts_are_flagged_after_three_intervals() -> None:
    now = time.time()
    docs = [{"host": "fresh", "updated_at": now - 30}, {"host": "quiet", "updated_at": now - 200}]
    assert stale_hosts(docs, now, interval=60) == {"quiet"}


@pytest.mark.parametrize(("new_doc", "old_doc", "user", "allowed"), [
    ({"_id": "host:a", "host": "a", "agent_user": "u1"}, None, "u1", True),
    ({"_id": "host:a", "host": "a", "agent_user": "u1", "_rev": "1-x"},
     {"_id": "host:a", "host": "a", "agent_user": "u1"}, "u1", True),
    # CouchDB 3.5 passes oldDoc null for a new_edits:false revision that starts a new branch.
    ({"_id": "host:a", "host": "a", "agent_user": "u2", "_rev": "1-zzzz"}, None, "u2", False),
    ({"_id": "host:a", "host": "a", "agent_user": "u2", "_rev": "2-y"},
     {"_id": "host:a", "host": "a", "agent_user": "u1"}, "u2", False),
    ({"_id": "host:b", "host": "a", "agent_user": "u1"}, None, "u1", False),
    ({"_id": "host:a", "host": "a", "agent_user": "u1", "_deleted": True}, None, "u1", False),
])
def test_validate_function_in_node(new_doc: dict[str, object], old_doc: object, user: str,
                                   allowed: bool) -> None:
    """The rules as CouchDB calls them, including what pouchdb-server never passes (oldDoc null
    for a new branch)."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    script = (f"var v = {DESIGN['validate_doc_update']};\n"
              f"try {{ v({json.dumps(new_doc)}, {json.dumps(old_doc)}, "
              f"{{name: {json.dumps(user)}, roles: ['couchlog_agent']}}, {{}}); "
              "console.log('allowed'); } catch (e) { console.log('refused', JSON.stringify(e)); }")
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("allowed" if allowed else "refused"), out
