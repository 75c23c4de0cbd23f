"""What the agent opens, and what it finishes: only regular files (issue 9 item 1), never a
hang on a FIFO (issue 13 item 2), and files rotated away while it was stopped (issue 13 item 9).

Each test compares the exact multiset of documents in the database with the lines written.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.integration.harness import append, events, numbered, pipeline

pytestmark = pytest.mark.integration


def device_node(path: Path) -> None:
    """A character device (/dev/null's numbers); a symlink to /dev/null where mknod is refused."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:
        path.symlink_to("/dev/null")


def test_only_regular_files_are_shipped_and_each_skip_is_logged_once(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root password is hunter2\n")
    secret.chmod(0o600)
    (logs / "link.log").symlink_to(secret)
    os.mkfifo(logs / "fifo.log")
    device_node(logs / "device.log")
    (logs / "folder.log").mkdir()
    (logs / "loop.log").symlink_to(logs / "loop2.log")
    (logs / "loop2.log").symlink_to(logs / "loop.log")
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / "*.log")]}).start()
    written = append(logs / "app.log", numbered("app", 0, 500))
    flow.wait_for(written)
    time.sleep(3)  # several rescans (scan_interval is 1s): each skip must still be logged once
    written += append(logs / "app.log", numbered("more", 0, 500))
    flow.wait_for(written)
    flow.stop()
    skipped = Counter(e["path"] for e in events(flow, "file_skipped"))
    assert skipped == Counter({str(logs / name): 1 for name in (
        "link.log", "fifo.log", "device.log", "folder.log", "loop.log", "loop2.log")}), skipped
    reasons = {Path(e["path"]).name: e["reason"] for e in events(flow, "file_skipped")}
    assert reasons["fifo.log"] == "fifo" and reasons["folder.log"] == "folder"
    assert reasons["link.log"].startswith("symlink") and "loop" in reasons["loop.log"]
    assert reasons["device.log"] in ("device", "symlink (to a device; follow_symlinks is false)")


def test_follow_symlinks_follows_only_links_to_regular_files(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    target = tmp_path / "elsewhere.log"
    written = append(target, numbered("linked", 0, 300))
    (logs / "link.log").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (logs / "fifo-link.log").symlink_to(tmp_path / "fifo")
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "*.log")], "follow_symlinks": True}).start()
    flow.wait_for(written)
    written += append(target, numbered("more", 0, 300))
    flow.wait_for(written)
    flow.stop()
    assert [e["reason"] for e in events(flow, "file_skipped")] == ["symlink to a fifo"]


def test_a_fifo_renamed_over_a_followed_path_does_not_hang_the_agent(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """A scan finds a regular file at the path; a FIFO replaces it before the tailer opens it.
    Opening a FIFO for reading waits for a writer: the whole agent hung, deaf to SIGTERM."""
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    flips = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        # A new empty regular file each time (a new inode the agent opens), then a FIFO.
        spare = logs / "spare"
        spare.touch()
        os.rename(spare, log)
        time.sleep(0.001)
        os.mkfifo(spare)
        os.rename(spare, log)
        time.sleep(0.001)
        flips += 1
    data = logs / "data"
    written = append(data, numbered("after-fifos", 0, 1000))
    os.rename(data, log)
    flow.wait_for(written)
    flow.stop()  # SIGTERM: a hung agent fails here
    assert flips > 100
    assert [e["reason"] for e in events(flow, "file_skipped")] == ["fifo"]


def test_a_file_renamed_out_of_paths_while_stopped_is_read_to_its_end(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    written = append(log, numbered("before", 0, 1000))
    flow.wait_for(written)
    flow.stop()
    # Written and rotated while the agent is stopped, the rest ends without a newline.
    written += append(log, numbered("unread", 0, 700))
    with log.open("ab") as f:
        f.write(b"unterminated last line")
    written["unterminated last line"] += 1
    os.rename(log, logs / "app.log.1")
    written += append(log, numbered("new", 0, 300))
    flow.start()
    flow.wait_for(written)
    wait_for(lambda: any(e["path"].endswith("app.log.1") for e in events(flow, "file_released")),
             30, "the rotated file to be released")
    flow.stop()
    assert [Path(e["path"]).name for e in events(flow, "unfinished_file_found")] == ["app.log.1"]


def test_the_last_multiline_event_of_a_file_rotated_before_a_restart_is_shipped(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """log4j's hourly rotation with `paths: [server.log]`: the agent stops while the rotated
    file is still read (within rotate_wait), its last event still pending."""
    log = logs / "server.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {
        "paths": [str(log)], "rotate_wait": "1h", "multiline": {"start": r"^\[", "timeout": "1h"}}).start()
    trace = ["java.lang.IllegalStateException: boom", "\tat a.b.C.d(C.java:1)",
             "\tat a.b.C.e(C.java:2)"]
    lines = []
    expected: Counter[str] = Counter()
    for n in range(200):
        event = [f"[2016-12-19 18:{n // 60:02d}:{n % 60:02d}] ERROR event {n}", *trace]
        lines += event
        expected["\n".join(event)] += 1
    append(log, lines)
    last = expected.copy()
    del last["\n".join(lines[-4:])]
    flow.wait_for(last)  # every event but the last, which waits for a line after it
    os.rename(log, logs / "server.log.2016-12-19-18")
    append(log, ["[2016-12-19 19:00:00] INFO new hour, its event still open"])
    flow.stop()
    flow.start()
    flow.wait_for(expected)
    flow.stop()
