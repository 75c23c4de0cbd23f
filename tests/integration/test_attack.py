"""Attacks on the running agent (issue 13 review): trees, links and files a careless or hostile
user can put under the globs. Each test compares the exact multiset of documents in the
database with the lines written."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.harness import Pipeline, append, numbered
from tests.integration.test_delivery import through

pytestmark = pytest.mark.integration


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "logs"
    folder.mkdir()
    yield folder
    # pytest's own clean-up recurses, and fails on a tree 1,200 folders deep; rm does not.
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def pipeline(tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
             **source: Any) -> Pipeline:
    return Pipeline(tmp_path, couch, couchdb_url, database, [{"name": "s", **source}])


def deep_tree(top: Path, depth: int) -> Path:
    """`top/d/d/.../d` (`depth` folders), made through descriptors: its path is longer than
    any one call may name."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        log = os.open("deep.log", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(log, b"a line at the bottom\n")
        os.close(log)
    finally:
        os.close(fd)
    return top / "d"


@pytest.mark.parametrize("follow_symlinks", [False, True])
def test_symlink_loops_under_doublestar_do_not_hang_discovery(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        follow_symlinks: bool) -> None:
    """`glob` follows symlinked folders under `**`: two links to `..` made the first scan walk
    2^40 paths, so the agent never finished starting (and its memory grew)."""
    (logs / "app").mkdir()
    (logs / "app" / "up").symlink_to("..")
    (logs / "app" / "again").symlink_to("..")
    written = append(logs / "app" / "app.log", numbered("app", 0, 300))
    flow = pipeline(tmp_path, couch, couchdb_url, database, paths=[str(logs / "**" / "*.log")],
                    follow_symlinks=follow_symlinks).start()
    written += append(logs / "new.log", numbered("new", 0, 300))
    flow.wait_for(written)
    flow.stop()


def test_a_deep_tree_under_doublestar_neither_crashes_nor_stops_discovery(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """A tree 1,200 folders deep: watchdog's recursive watch (os.walk) and `glob`'s `**` both
    recursed into a RecursionError, so the agent failed at start as if it had a bug; with
    inotify out of the way, the scan still failed and no file of the source was followed."""
    deep_tree(logs, 1200)
    written = append(logs / "app.log", numbered("app", 0, 300))
    written["a line at the bottom"] += 1
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    paths=[str(logs / "**" / "*.log")]).start()
    written += append(logs / "new.log", numbered("new", 0, 300))
    flow.wait_for(written)
    flow.stop()


def test_kill_9_at_random_moments_during_rotation(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """A logger writes and rotates by rename while the agent is killed with SIGKILL at random
    moments and started again at once: the exact multiset survives. (Rotated out of the
    globs, a file created and rotated away while the agent is down, or before its first
    offsets save, cannot be found by any agent: README says so.)"""
    rng = random.Random(13)
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, paths=[str(logs / "app.log*")],
                    rotate_wait="200ms")
    flow.agent.start()
    written: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def logger() -> None:
        n = generation = 0
        while not stop.is_set():
            lines = numbered(f"r{generation}", n, rng.randint(1, 400))
            n += len(lines)
            got = append(log, lines)
            with lock:
                written.update(got)
            if rng.random() < 0.3:
                generation += 1
                os.rename(log, logs / f"app.log.{generation}")
            time.sleep(rng.random() * 0.02)

    thread = threading.Thread(target=logger)
    thread.start()
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            flow.agent.kill()
            flow.agent.start()
    finally:
        stop.set()
        thread.join()
    flow.agent.wait_started()
    flow.wait_for(written, timeout=120)
    flow.stop()


def test_hard_links_of_one_file_are_shipped_once_without_a_rename_every_scan(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """Each scan found the file under both names and renamed its tailer back and forth."""
    written = append(logs / "a.log", numbered("linked", 0, 500))
    os.link(logs / "a.log", logs / "b.log")
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    paths=[str(logs / "*.log")]).start()
    flow.wait_for(written)
    time.sleep(4)  # several rescans (scan_interval is 1s)
    written += append(logs / "b.log", numbered("more", 0, 500))
    flow.wait_for(written)
    flow.stop()
    renames = flow.agent.log().count('"file_renamed"')
    assert renames <= 1, f"{renames} file_renamed events for one file under two names"


def test_hostile_lines_are_each_one_document(tmp_path: Path, logs: Path, couch: CouchDB,
                                             couchdb_url: str, database: str) -> None:
    """Hostile JSON, NULs, invalid UTF-8, 100,000 open brackets and a 100 MB line without a
    newline for a while: one document per line, and the agent goes on."""
    log = logs / "app.json"
    lines = [b'{"a":1,"a":2}', b'{"__proto__":{"polluted":1},"constructor":{"prototype":1}}',
             b'{"n":1e400,"m":-1e400,"i":123456789012345678901234567890123456789}',
             b'{"i":' + b"9" * 5000 + b'}', b'{"nan":NaN}', b'{"s":"\\ud800"}',
             b'{"s":"\\u0000"}', b"\x00" * 1000, b"\xff\xfe\xfd", b"[" * 100000,
             b'{"a":' * 300 + b"1" + b"}" * 300, b"{}", b"null", b"\r", b'{"_id":"x","_rev":"1-a"}',
             b'{"agent":1,"xagent":2,"_deleted":true,"_attachments":{}}']
    expected = len([line for line in lines if line.strip(b"\r")])
    big = 100 * 1024 * 1024
    with log.open("wb") as f:
        f.write(b"\n".join(lines) + b"\n")
        f.write(b"y" * big)
        f.write(b"\n")
        f.write(b"last\r\n")
    flow = pipeline(tmp_path, couch, couchdb_url, database, paths=[str(log)])
    (tmp_path / "etc" / "conf.d" / "s.yaml").write_text(yaml.safe_dump(
        {"name": "s", "paths": [str(log)], "format": "json", "database": database}))
    flow.start()
    wait_for(lambda: couch.count(database) >= expected + 2, 120, "all lines")
    time.sleep(2)
    assert couch.count(database) == expected + 2
    flow.stop()



def test_unreadable_vanishing_replaced_and_regrown_files(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """A file chmod 000 until later, files that vanish between scan and open, a file replaced
    by a folder, a file truncated and regrown past where it was read."""
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    paths=[str(logs / "*.log")]).start()
    written = append(logs / "locked.log", numbered("locked", 0, 200))
    os.chmod(logs / "locked.log", 0)
    written += append(logs / "gone.log", numbered("gone", 0, 200))
    written += append(logs / "shrinks.log", numbered("before", 0, 300))
    flow.wait_for(written - Counter(numbered("locked", 0, 200)) if os.geteuid() else written)
    for n in range(300):
        blink = logs / f"blink{n}.log"
        blink.write_text("")
        blink.unlink()
    (logs / "gone.log").unlink()
    (logs / "gone.log").mkdir()
    with (logs / "shrinks.log").open("r+b") as f:
        f.truncate(0)
    written += append(logs / "shrinks.log", numbered("after", 0, 600))
    time.sleep(2)
    os.chmod(logs / "locked.log", 0o644)
    written += append(logs / "locked.log", numbered("unlocked", 0, 100))
    flow.wait_for(written)
    flow.stop()



def test_a_201_without_couchdb_results_is_a_failed_request_never_a_dead_letter(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """Issue 13 item 6: only a CouchDB-shaped error about a document may dead-letter it. A
    201 whose body is not a list of results (a page from something in the way) said nothing
    about any document; each document was charged a retry for it, and after five such
    answers every document was dead-lettered, never to reach CouchDB."""
    with FaultProxy(couchdb_url) as proxy:
        proxy.set("html201")
        flow = Pipeline(tmp_path, couch, through(proxy, couchdb_url), database,
                        [{"name": "s", "paths": [str(logs / "app.log")]}],
                        shipping={"retry_max_backoff": "200ms"})
        flow.start()
        written = append(logs / "app.log", numbered("page", 0, 500))
        # Five answers used to dead-letter every document.
        wait_for(lambda: proxy.bulk_requests >= 6, 60, "several answers without results")
        proxy.set("pass")
        flow.wait_for(written, timeout=90)
        flow.stop()
    assert not (flow.config.parent / "state" / "dead-letter.jsonl").exists()

