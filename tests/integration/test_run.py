"""End to end: `agent run` follows a growing fail2ban log and the database holds exactly its lines.

The check is always the exact multiset of documents against the lines
written: nothing missing, nothing doubled.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import fail2ban_log
from bench.fail2ban_log import SEED_SCHEMA
from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB

pytestmark = pytest.mark.integration

def expected_docs(path: Path) -> Counter[tuple[Any, ...]]:
    """What the database must hold for `path`: one entry per line kept by include [NOTICE, Ban]."""
    expected: Counter[tuple[Any, ...]] = Counter()
    offset = 0
    for raw in path.read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        line = raw.rstrip(b"\r\n").decode()
        if "NOTICE" in line and "Ban" in line:
            tokens = line.split()
            if tokens[2] == "fail2ban.actions":
                expected[(offset, tokens[0], tokens[1], tokens[5].strip("[]"), tokens[7],
                          "server")] += 1
            else:
                expected[(offset, "parse_error", line)] += 1
        offset += len(raw)
    return expected


def stored_docs(couch: CouchDB, database: str) -> Counter[tuple[Any, ...]]:
    stored: Counter[tuple[Any, ...]] = Counter()
    for doc in couch.docs(database):
        meta = doc["agent"]
        if "parse_error" in meta:
            stored[(meta["offset"], "parse_error", doc["message"])] += 1
        else:
            stored[(meta["offset"], doc["date"], doc["hour"], doc["process"], doc["ip"],
                    doc["machine"])] += 1
    return stored


def fail2ban_source(log_path: Path, database: str) -> dict[str, Any]:
    return {"name": "fail2ban", "database": database, "paths": [str(log_path)],
            "include": ["NOTICE", "Ban"], "schema": SEED_SCHEMA, "fields": {"machine": "server"}}


def write_lines(path: Path, rng: random.Random, start: int, count: int,
                pause_every: int = 0) -> None:
    """Append lines the way a logger does; now and then a line arrives in two writes."""
    with path.open("ab", buffering=0) as log:
        for index in range(start, start + count):
            line = (fail2ban_log.line(rng, index) + "\n").encode()
            if index % 17 == 0:
                log.write(line[:20])
                time.sleep(0.002)
                log.write(line[20:])
            else:
                log.write(line)
            if pause_every and index % pause_every == 0:
                time.sleep(0.01)


def assert_exact(couch: CouchDB, database: str, log_path: Path) -> None:
    expected = expected_docs(log_path)
    stored = stored_docs(couch, database)
    missing = expected - stored
    extra = stored - expected
    assert not missing and not extra, f"missing {list(missing)[:5]}, extra {list(extra)[:5]}"


def test_ships_growing_log_then_resumes_after_restart(tmp_path: Path, couch: CouchDB,
                                                       couchdb_url: str, database: str) -> None:
    rng = random.Random(2)
    log_path = tmp_path / "fail2ban.log"
    log_path.touch()
    config = write_config(tmp_path / "etc", couchdb_url, [fail2ban_source(log_path, database)])

    agent = AgentProcess(config)
    with agent:
        write_lines(log_path, rng, 0, 600, pause_every=5)
        total = sum(expected_docs(log_path).values())
        wait_for(lambda: couch.count(database) >= total, 60, f"{total} documents")
        assert agent.stop() == 0, agent.log()
    assert_exact(couch, database, log_path)

    write_lines(log_path, rng, 600, 400)
    with open(log_path, "ab") as log:
        log.write(b"2017-06-14 23:59:59,999 fail2ban.actions        [1112]: NOTICE  [sshd] Ban 9.9")
    with agent:
        total = sum(expected_docs(log_path).values())
        wait_for(lambda: couch.count(database) >= total, 60, f"{total} documents after restart")
        with open(log_path, "ab") as log:
            log.write(b".9.9\n")
        total = sum(expected_docs(log_path).values())
        wait_for(lambda: couch.count(database) >= total, 60, "the completed partial line")
        assert agent.stop() == 0, agent.log()
    assert_exact(couch, database, log_path)
    assert '"agent_stopped"' in agent.log()


def test_kill_9_while_shipping_loses_and_doubles_nothing(tmp_path: Path, couch: CouchDB,
                                                         couchdb_url: str, database: str) -> None:
    rng = random.Random(9)
    log_path = tmp_path / "fail2ban.log"
    write_lines(log_path, rng, 0, 20000)
    config = write_config(tmp_path / "etc", couchdb_url, [fail2ban_source(log_path, database)],
                          shipping={"batch_max_docs": 200})
    total = sum(expected_docs(log_path).values())
    agent = AgentProcess(config)
    for _ in range(3):
        with agent:
            before = couch.count(database)
            wait_for(lambda before=before: couch.count(database) > before or
                     couch.count(database) >= total, 60, "shipping to start")
            agent.kill()
    with agent:
        wait_for(lambda: couch.count(database) >= total, 120, f"{total} documents")
        assert agent.stop() == 0, agent.log()
    assert_exact(couch, database, log_path)
