"""The fleet view with real agents: `agent setup` installs couchlog_fleet, each agent keeps its
host's document up to date (start, every interval, stop), an agent user claiming another host is
refused without harm to shipping, and `agent report fleet` lists every host."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import fleet
from agent.setup import fleet_security
from tests.agentproc import AgentProcess, wait_for, write_config
from tests.backendsetup import Account, account, backend_address, delete_users, run_agent
from tests.couch import CouchDB
from tests.integration.harness import append, numbered

pytestmark = pytest.mark.integration


class Host:
    """One machine: its own agent user, host name, log file, database and agent config."""

    def __init__(self, folder: Path, bare_url: str, user: Account, host: str, database: str,
                 reader: Account) -> None:
        self.user, self.host, self.database, self.reader = user, host, database, reader
        self.log = folder / "app.log"
        self.config = write_config(
            folder / "etc", bare_url,
            [{"name": "app", "database": database, "paths": [str(self.log)], "schema": "$msg..."}],
            couchdb={"username": user.name, "password_file": str(user.password_file)},
            host=host, fleet={"interval": "1s"},
            reader={"username": reader.name, "password_file": str(reader.password_file)})


@pytest.fixture
def hosts(tmp_path: Path, couchdb_url: str, couch: CouchDB) -> Iterator[list[Host]]:
    _, bare = backend_address(couchdb_url)
    tag = secrets.token_hex(3)
    reader = account(tmp_path / "secrets", "reader")
    made = [Host(tmp_path / name, bare, account(tmp_path / "secrets", f"agent{name}"),
                 f"{name}-{tag}", f"log_fleet_{name}_{tag}", reader)
            for name in ("alpha", "beta")]
    for host in made:
        done = run_agent("setup", "-c", str(host.config), "--url", couchdb_url,
                         "--reader", reader.name,
                         "--reader-password-file", str(reader.password_file))
        assert done.returncode == 0, done.stderr
    yield made
    for host in made:
        couch.delete_db(host.database)
        status, doc = couch.request("GET", f"/{fleet.DATABASE}/host:{host.host}")
        if status == 200:
            couch.request("DELETE", f"/{fleet.DATABASE}/host:{host.host}?rev={doc['_rev']}")
    delete_users(couch, reader.name, *(h.user.name for h in made))


def fleet_doc(couch: CouchDB, host: str) -> dict[str, Any] | None:
    status, doc = couch.request("GET", f"/{fleet.DATABASE}/host:{host}")
    return doc if status == 200 else None


def revision(doc: dict[str, Any] | None) -> int:
    return int(doc["_rev"].split("-")[0]) if doc else 0


def messages(couch: CouchDB, database: str) -> Counter[str]:
    return Counter(str(doc["msg"]) for doc in couch.docs(database))


def test_setup_installs_the_fleet_database(hosts: list[Host], couch: CouchDB) -> None:
    status, security = couch.request("GET", f"/{fleet.DATABASE}/_security")
    assert status == 200 and security["members"] == fleet_security()["members"]
    status, design = couch.request("GET", f"/{fleet.DATABASE}/{fleet.DESIGN['_id']}")
    assert status == 200 and design["validate_doc_update"] == fleet.VALIDATE


def test_each_host_keeps_one_document_up_to_date(hosts: list[Host], couch: CouchDB,
                                                 couchdb_url: str) -> None:
    alpha, beta = hosts
    agents = [AgentProcess(h.config).start() for h in hosts]
    try:
        for agent in agents:
            agent.wait_started()
        expected = {h.host: append(h.log, numbered(h.host, 0, 40 if h is alpha else 15))
                    for h in hosts}
        for h in hosts:
            wait_for(lambda h=h: messages(couch, h.database) == expected[h.host], 60,
                     f"{h.host}'s documents")
            # Updated each interval, in place: the revision grows, and it reports what it shipped.
            wait_for(lambda h=h: (d := fleet_doc(couch, h.host)) is not None and d["event"] == "tick"
                     and d["databases"][h.database]["stored"] == sum(expected[h.host].values()),
                     60, f"{h.host}'s fleet document to count its documents")
        first = {h.host: revision(fleet_doc(couch, h.host)) for h in hosts}
        for h in hosts:
            wait_for(lambda h=h: revision(fleet_doc(couch, h.host)) > first[h.host], 60,
                     f"{h.host}'s next fleet document")
        for agent in agents:
            assert agent.stop() == 0
    finally:
        for agent in agents:
            if agent.running():
                agent.kill()
    docs = {d["_id"]: d for d in couch.docs(fleet.DATABASE)}
    for h in hosts:
        doc = docs[f"host:{h.host}"]
        assert doc["host"] == h.host and doc["agent_user"] == h.user.name
        assert doc["event"] == "stop" and doc["health"] == "OK"
        assert doc["summary"].startswith("COUCHLOG OK - ")  # at stop: no file followed
        assert doc["bytes_behind"] == 0 and doc["spool_documents"] == 0
        assert doc["sources"]["app"]["lines"] == sum(expected[h.host].values())
        assert revision(doc) >= 3  # start, at least one tick, stop
    # One document per host, whatever the number of writes.
    ours = [i for i in docs if i.endswith(alpha.host) or i.endswith(beta.host)]
    assert sorted(ours) == sorted([f"host:{alpha.host}", f"host:{beta.host}"])

    # `agent report fleet` as the reader: every host, and a host gone quiet is flagged.
    status, _ = couch.request("PUT", f"/{fleet.DATABASE}/host:gone-{alpha.host}", {
        "host": f"gone-{alpha.host}", "agent_user": "old", "updated_at": time.time() - 3600,
        "health": "OK", "bytes_behind": 5, "spool_documents": 0, "spool_bytes": 0,
        "event": "tick"})
    assert status in (201, 202)
    try:
        # As the reader, with the default interval (a minute): the agents stopped seconds ago.
        _, bare = backend_address(couchdb_url)
        reader = ["--url", bare, "--user", alpha.reader.name,
                  "--password-file", str(alpha.reader.password_file)]
        done = run_agent("report", "fleet", *reader, "--format", "json")
        assert done.returncode == 0, done.stderr
        rows = {r["host"]: r for r in json.loads(done.stdout)}
        assert rows[alpha.host]["flag"] == rows[beta.host]["flag"] == "stopped"
        assert rows[f"gone-{alpha.host}"]["flag"].startswith("NOT SEEN")
        assert rows[alpha.host]["health"] == "OK" and rows[alpha.host]["lag_bytes"] == 0
        table = run_agent("report", "fleet", *reader, "--format", "table")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["HOST", "LAST", "SEEN"]
        # Hosts gone quiet come first.
        assert lines[1].startswith(f"gone-{alpha.host}") and "NOT SEEN" in lines[1]
        assert any(line.startswith(alpha.host) for line in lines)
    finally:
        _, doc = couch.request("GET", f"/{fleet.DATABASE}/host:gone-{alpha.host}")
        couch.request("DELETE", f"/{fleet.DATABASE}/host:gone-{alpha.host}?rev={doc['_rev']}")


def test_an_agent_claiming_another_host_is_refused_and_still_ships(
        hosts: list[Host], couch: CouchDB, tmp_path: Path, couchdb_url: str) -> None:
    alpha, beta = hosts
    with AgentProcess(alpha.config) as owner:
        owner.wait_started()
        wait_for(lambda: fleet_doc(couch, alpha.host) is not None, 60, "alpha's fleet document")
        assert owner.stop() == 0
    owned = fleet_doc(couch, alpha.host)
    assert owned is not None
    # beta's user, configured with alpha's host name.
    _, bare = backend_address(couchdb_url)
    impostor = Host(tmp_path / "impostor", bare, beta.user, alpha.host, beta.database,
                    account(tmp_path / "secrets", "unused"))
    with AgentProcess(impostor.config) as agent:
        agent.wait_started()
        expected = append(impostor.log, numbered("impostor", 0, 25))
        wait_for(lambda: messages(couch, beta.database) == expected, 60, "its documents")
        wait_for(lambda: '"fleet_write_failed"' in agent.log(), 60, "the refusal in its log")
        time.sleep(3)  # three more intervals: each is refused, and the log says it once
        assert agent.stop() == 0
    failed = [json.loads(line) for line in agent.log().splitlines()
              if '"fleet_write_failed"' in line]
    assert len(failed) == 1 and ("401" in failed[0]["error"] or "403" in failed[0]["error"])
    assert fleet_doc(couch, alpha.host) == owned
    assert messages(couch, beta.database) == expected
