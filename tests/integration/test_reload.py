"""Reload without loss (issue 12 item 3): a real `agent run`, reloaded by `agent reload` or
SIGHUP, while lines are written; each check is the exact multiset of documents in CouchDB.

Each line is `<index> <word>`; each document is keyed by (source, offset) and carries which
parser made it (a static field), so a line missing, doubled or parsed by the wrong parser
shows in the comparison.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import yaml

from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

V1 = r"^(?P<n>\d+) (?P<word>\w+)$"
V2 = r"^(?P<num>\d+) (?P<text>\w+)$"
EVENT = r"\n  at a\d+\n  at b\d+$"
"""What follows the first line in a whole three-line event."""


def source(name: str, path: Path, database: str, regex: str = V1, version: str = "v1",
           **more: Any) -> dict[str, Any]:
    return {"name": name, "paths": [str(path)], "database": database, "regex": regex,
            "fields": {"parser": version}, **more}


def write_source(config: Path, spec: dict[str, Any]) -> None:
    (config.parent / "conf.d" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))


def append(path: Path, start: int, count: int, pause: float = 0.0) -> None:
    with path.open("ab", buffering=0) as log:
        for index in range(start, start + count):
            log.write(f"{index} w{index}\n".encode())
            if pause:
                time.sleep(pause)


def lines_of(path: Path) -> list[tuple[int, int]]:
    """(offset, index) of each complete line."""
    found, offset = [], 0
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            found.append((offset, int(raw.split()[0])))
        offset += len(raw)
    return found


def stored(couch: CouchDB, *databases: str) -> Counter[tuple[str, int, int, str]]:
    """(source, offset, index, parser) per document, over the databases."""
    docs: Counter[tuple[str, int, int, str]] = Counter()
    for database in databases:
        for doc in couch.docs(database):
            meta = doc["agent"]
            assert "parse_error" not in meta, doc
            index = int(doc["n"] if doc["parser"] == "v1" else doc["num"])
            word = doc["word"] if doc["parser"] == "v1" else doc["text"]
            assert word == f"w{index}", doc
            docs[(meta["source"], meta["offset"], index, doc["parser"])] += 1
    return docs


def reload(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "reload", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def reload_while_writing(config: Path, log_path: Path, start: int, count: int, after: float,
                         spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Append `count` lines from `start` (1 ms apart) and, `after` seconds into that, replace
    the source with `spec` and reload; the reload's outcome once every line is written."""
    writer = threading.Thread(target=append, args=(log_path, start, count, 0.001))
    writer.start()
    try:
        time.sleep(after)
        write_source(config, spec)
        return reload(config)
    finally:
        writer.join()


def status(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def offsets_of(config: Path, source_name: str) -> list[int]:
    state = orjson.loads((config.parent / "state" / "offsets.json").read_bytes())
    return [entry["offset"] for key, entry in state["files"].items()
            if key.startswith(source_name + "/")]


@pytest.fixture
def other_database(couch: CouchDB) -> Iterator[str]:
    name = f"log_test_{uuid.uuid4().hex[:12]}"
    couch.create_db(name)
    yield name
    couch.delete_db(name)


def test_reload_adds_a_source(tmp_path: Path, couch: CouchDB, couchdb_url: str,
                              database: str) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    append(first, 0, 100)
    append(second, 0, 150)
    config = write_config(tmp_path / "etc", couchdb_url, [source("a", first, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 100, 60, "source a's documents")
        write_source(config, source("b", second, database))
        done = reload(config)
        assert done.returncode == 0, (done.stderr, agent.log())
        append(first, 100, 50)
        append(second, 150, 50)
        wait_for(lambda: couch.count(database) >= 350, 60, "both sources' documents")
        assert agent.stop() == 0, agent.log()
    expected = Counter([("a", o, i, "v1") for o, i in lines_of(first)]
                       + [("b", o, i, "v1") for o, i in lines_of(second)])
    assert stored(couch, database) == expected
    assert '"reload_done"' in agent.log()


def test_reload_changes_a_parser_while_lines_arrive(tmp_path: Path, couch: CouchDB,
                                                    couchdb_url: str, database: str) -> None:
    """Lines written before the reload are parsed by v1, lines after by v2, each exactly once,
    with lines arriving all through the reload."""
    log_path = tmp_path / "app.log"
    append(log_path, 0, 200)
    config = write_config(tmp_path / "etc", couchdb_url, [source("app", log_path, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 200, 60, "the first 200 documents")
        done = reload_while_writing(config, log_path, 200, 1500, 0.3,
                                    source("app", log_path, database, regex=V2, version="v2"))
        assert done.returncode == 0, (done.stderr, agent.log())
        append(log_path, 1700, 200)
        wait_for(lambda: couch.count(database) >= 1900, 60, "every document")
        assert agent.stop() == 0, agent.log()
    docs = stored(couch, database)
    assert sum(docs.values()) == 1900 and max(docs.values()) == 1, "a line doubled"
    assert {(o, i) for _, o, i, _ in docs} == set(lines_of(log_path)), "a line lost"
    by_offset = sorted((o, version) for _, o, _, version in docs)
    versions = [version for _, version in by_offset]
    switch = versions.index("v2")
    assert versions == ["v1"] * switch + ["v2"] * (len(versions) - switch), \
        "a v1 document after a v2 one: a line was read again or out of order"
    assert 200 <= switch <= 1700, switch
    assert '"file_taken_over"' in agent.log(), "the new tailer did not go on from the old one"


def test_reload_removes_a_source(tmp_path: Path, couch: CouchDB, couchdb_url: str,
                                 database: str) -> None:
    kept, removed = tmp_path / "kept.log", tmp_path / "removed.log"
    append(kept, 0, 100)
    append(removed, 0, 100)
    config = write_config(tmp_path / "etc", couchdb_url,
                          [source("kept", kept, database), source("gone", removed, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 200, 60, "both sources' documents")
        (config.parent / "conf.d" / "gone.yaml").unlink()
        assert reload(config).returncode == 0, agent.log()
        append(removed, 100, 100)
        append(kept, 100, 100)
        wait_for(lambda: couch.count(database) >= 300, 60, "the kept source's new lines")
        time.sleep(1.0)  # time enough for the removed source's lines, were it still followed
        assert agent.stop() == 0, agent.log()
    expected = Counter([("kept", o, i, "v1") for o, i in lines_of(kept)]
                       + [("gone", o, i, "v1") for o, i in lines_of(removed)[:100]])
    assert stored(couch, database) == expected
    # Its offsets stay in the state: added back, it would go on from there.
    assert offsets_of(config, "gone") == [lines_of(removed)[100][0]]


def test_reload_moves_a_source_to_another_database(tmp_path: Path, couch: CouchDB,
                                                   couchdb_url: str, database: str,
                                                   other_database: str) -> None:
    log_path = tmp_path / "app.log"
    append(log_path, 0, 200)
    config = write_config(tmp_path / "etc", couchdb_url, [source("app", log_path, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 100, 60, "shipping to start")
        done = reload_while_writing(config, log_path, 200, 1000, 0.2,
                                    source("app", log_path, other_database))
        assert done.returncode == 0, (done.stderr, agent.log())
        wait_for(lambda: couch.count(database) + couch.count(other_database) >= 1200, 60,
                 "every document")
        wait_for(lambda: '"database_retired"' in agent.log(), 30, "the old shipper to stop")
        assert agent.stop() == 0, agent.log()
    expected = Counter(("app", o, i, "v1") for o, i in lines_of(log_path))
    assert stored(couch, database, other_database) == expected
    old = sorted(o for _, o, _, _ in stored(couch, database))
    new = sorted(o for _, o, _, _ in stored(couch, other_database))
    assert old and new and old[-1] < new[0], "the move is not one cut in the file"


def test_broken_config_is_refused_and_the_agent_goes_on(tmp_path: Path, couch: CouchDB,
                                                        couchdb_url: str, database: str) -> None:
    log_path = tmp_path / "app.log"
    append(log_path, 0, 50)
    config = write_config(tmp_path / "etc", couchdb_url, [source("app", log_path, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 50, 60, "the first documents")
        good = (config.parent / "conf.d" / "app.yaml").read_text()
        write_source(config, {**source("app", log_path, database, regex=V2, version="v2"),
                              "regex": "(?P<n>", "no_such_key": 1})
        checked = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(config)],
                                 capture_output=True, text=True, timeout=60)
        refused = reload(config)
        assert refused.returncode == 2, (refused.stderr, agent.log())
        problems = [line for line in checked.stderr.splitlines() if "config error" in line]
        assert problems and all(p in refused.stderr for p in problems), \
            (checked.stderr, refused.stderr)
        assert '"reload_failed"' in agent.log()
        told = status(config)
        assert told.returncode == 1 and "reload refused" in told.stdout, told.stdout
        append(log_path, 50, 50)
        wait_for(lambda: couch.count(database) >= 100, 60, "lines shipped by the running config")
        (config.parent / "conf.d" / "app.yaml").write_text(good)
        assert reload(config).returncode == 0, agent.log()
        told = status(config)
        assert told.returncode == 0, told.stdout
        assert agent.stop() == 0, agent.log()
    assert stored(couch, database) == Counter(("app", o, i, "v1") for o, i in lines_of(log_path))


def test_sighup_reloads_and_shipping_settings_wait_for_a_restart(tmp_path: Path, couch: CouchDB,
                                                          couchdb_url: str,
                                                          database: str) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    append(first, 0, 20)
    append(second, 0, 30)
    config = write_config(tmp_path / "etc", couchdb_url, [source("a", first, database)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        settings = yaml.safe_load(config.read_text())
        settings["shipping"]["batch_max_docs"] = 7
        config.write_text(yaml.safe_dump(settings))
        write_source(config, source("b", second, database))
        assert agent.process is not None
        os.kill(agent.process.pid, signal.SIGHUP)
        wait_for(lambda: couch.count(database) >= 50, 60, "both sources' documents")
        wait_for(lambda: '"reload_restart_needed"' in agent.log(), 30, "the restart notice")
        told = status(config)
        assert told.returncode == 1 and "shipping: applied at the next restart" in told.stdout, \
            told.stdout
        assert agent.stop() == 0, agent.log()
    assert stored(couch, database) == Counter([("a", o, i, "v1") for o, i in lines_of(first)]
                                              + [("b", o, i, "v1") for o, i in lines_of(second)])


def test_reload_with_no_agent_running_exits_3(tmp_path: Path, couchdb_url: str) -> None:
    config = write_config(tmp_path / "etc", couchdb_url, [])
    done = reload(config)
    assert done.returncode == 3
    assert "no running agent to reload" in done.stderr and "agent run" in done.stderr


def test_a_source_moved_while_couchdb_is_down_delivers_its_spool_to_the_old_database(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        other_database: str) -> None:
    """What was queued and spooled for the old database while CouchDB was down goes there once
    it is back; only then does the old shipper stop."""
    log_path = tmp_path / "app.log"
    with FaultProxy(couchdb_url) as proxy:
        proxy.set("500")
        admin = urlsplit(couchdb_url)
        url = f"http://{admin.username}:{admin.password}@127.0.0.1:{proxy.port}" \
            if admin.username else proxy.url
        config = write_config(tmp_path / "etc", url, [source("app", log_path, database)])
        append(log_path, 0, 300)
        with AgentProcess(config) as agent:
            agent.wait_started()
            wait_for(lambda: spooled(config, database) > 0, 60, "documents spooled for the old one")
            write_source(config, source("app", log_path, other_database))
            done = reload(config)
            assert done.returncode == 0, (done.stderr, agent.log())
            append(log_path, 300, 200)
            time.sleep(1.0)
            assert '"database_retired"' not in agent.log(), "retired with documents undelivered"
            proxy.set("pass")
            wait_for(lambda: couch.count(database) + couch.count(other_database) >= 500, 60,
                     "every document")
            wait_for(lambda: '"database_retired"' in agent.log(), 30, "the old shipper to stop")
            assert agent.stop() == 0, agent.log()
    assert stored(couch, database, other_database) == Counter(
        ("app", o, i, "v1") for o, i in lines_of(log_path))
    old = sorted(o for _, o, _, _ in stored(couch, database))
    assert len(old) >= 300 and max(old) < min(o for _, o, _, _ in stored(couch, other_database))


def spooled(config: Path, database: str) -> int:
    """Documents the status snapshot says are spooled or queued for `database`."""
    try:
        snap = orjson.loads((config.parent / "state" / "status.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return 0
    db = snap.get("databases", {}).get(database, {})
    return int(db.get("spool_records", 0)) + int(db.get("queued", 0))


def append_events(path: Path, start: int, count: int, pause: float = 0.0) -> None:
    """Three-line events (a line and two `  at` lines), written a line at a time."""
    with path.open("ab", buffering=0) as log:
        for index in range(start, start + count):
            for line in (f"{index} w{index}\n", f"  at a{index}\n", f"  at b{index}\n"):
                log.write(line.encode())
                if pause:
                    time.sleep(pause)


def events_of(path: Path) -> list[tuple[int, int]]:
    """(offset, index) of each event: the lines starting with a number (a cut event would be
    a document at an `  at` line, which does not parse: `stored` refuses it)."""
    found, offset = [], 0
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw[:1].isdigit():
            found.append((offset, int(raw.split()[0])))
        offset += len(raw)
    return found


def test_reload_changes_a_multiline_source_without_cutting_an_event(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """An event still being assembled when the reload stops its tailer is read again whole by
    the new one: every event is one document, none cut in two, none doubled."""
    log_path = tmp_path / "app.log"
    multiline = {"start": r"^\d+ ", "timeout": "2s"}
    append_events(log_path, 0, 100)
    config = write_config(tmp_path / "etc", couchdb_url,
                          [source("app", log_path, database, regex=V1[:-1] + EVENT,
                                  multiline=multiline)])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 99, 60, "the first events")
        writer = threading.Thread(target=append_events, args=(log_path, 100, 500, 0.001))
        writer.start()
        try:
            time.sleep(0.3)
            write_source(config, source("app", log_path, database, regex=V2[:-1] + EVENT,
                                        version="v2", multiline=multiline))
            done = reload(config)
        finally:
            writer.join()
        assert done.returncode == 0, (done.stderr, agent.log())
        wait_for(lambda: couch.count(database) >= 600, 60, "every event (the last on timeout)")
        assert agent.stop() == 0, agent.log()
    docs = stored(couch, database)
    assert max(docs.values()) == 1, "an event doubled"
    assert {(o, i) for _, o, i, _ in docs} == set(events_of(log_path)), "an event lost or cut"
    versions = [version for _, version in sorted((o, v) for _, o, _, v in docs)]
    switch = versions.index("v2")
    assert versions == ["v1"] * switch + ["v2"] * (len(versions) - switch)


def test_a_restart_before_the_old_database_got_its_spool_still_delivers_it(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        other_database: str) -> None:
    """The agent stops while a database that no source ships to any more still has documents
    spooled (CouchDB down): at the next start they are delivered there, then it retires."""
    log_path = tmp_path / "app.log"
    with FaultProxy(couchdb_url) as proxy:
        proxy.set("500")
        admin = urlsplit(couchdb_url)
        url = f"http://{admin.username}:{admin.password}@127.0.0.1:{proxy.port}" \
            if admin.username else proxy.url
        config = write_config(tmp_path / "etc", url, [source("app", log_path, database)],
                              shutdown_timeout="1s")
        append(log_path, 0, 300)
        agent = AgentProcess(config)
        with agent:
            agent.wait_started()
            wait_for(lambda: spooled(config, database) >= 300, 60, "documents for the old one")
            write_source(config, source("app", log_path, other_database))
            assert reload(config).returncode == 0, agent.log()
            append(log_path, 300, 200)
            wait_for(lambda: spooled(config, other_database) >= 200, 60, "the new one's")
            assert agent.stop() == 0, agent.log()
        assert couch.count(database) == 0
        proxy.set("pass")
        with agent:
            agent.wait_started()
            wait_for(lambda: couch.count(database) + couch.count(other_database) >= 500, 60,
                     "every document")
            wait_for(lambda: '"database_retired"' in agent.log(), 30, "the old shipper to stop")
            assert agent.stop() == 0, agent.log()
    assert '"leftover_spool"' in agent.log()
    expected = Counter(("app", o, i, "v1") for o, i in lines_of(log_path))
    assert stored(couch, database, other_database) == expected
    assert len(stored(couch, database)) == 300
