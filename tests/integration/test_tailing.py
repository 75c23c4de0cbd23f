"""The tailing engine end to end: rotation, truncation, deletion, inode reuse, short files,
multi-line events, awkward real logs, many files, and restarts between all of them.

Each test compares the exact multiset of documents in the database with the lines written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.integration.harness import (
    append,
    messages_in,
    numbered,
    pipeline,
    sleep_until,
)

pytestmark = pytest.mark.integration


def write_at_rate(path: Path, prefix: str, seconds: float, rotate_every: float,
                  rotate_to: str, rate: int = 10_000) -> Counter[str]:
    """Write `rate` lines/s to `path` for `seconds`, renaming it to `rotate_to.N` and starting
    a new file every `rotate_every` seconds, as logrotate's create mode does."""
    written: Counter[str] = Counter()
    batch = rate // 100
    started = time.monotonic()
    next_rotation = started + rotate_every
    rotations = n = 0
    log = path.open("ab", buffering=0)
    try:
        while time.monotonic() - started < seconds:
            lines = numbered(prefix, n, batch)
            log.write(("\n".join(lines) + "\n").encode())
            written.update(lines)
            n += batch
            if time.monotonic() >= next_rotation:
                rotations += 1
                os.rename(path, path.parent / f"{rotate_to}.{rotations}")
                log.close()
                log = path.open("ab", buffering=0)
                next_rotation += rotate_every
            sleep_until(started + n / rate)
    finally:
        log.close()
    assert rotations >= 3
    return written


@pytest.mark.parametrize("glob", ["app.log", "app.log*"], ids=["renamed-out-of-glob", "renamed-within-glob"])
def test_rename_rotation_while_writing_10k_lines_per_second(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str, glob: str) -> None:
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / glob)]}).start()
    (logs / "app.log").touch()
    time.sleep(0.5)  # the agent is up and watching; not a correctness wait
    written = write_at_rate(logs / "app.log", "rot", seconds=3, rotate_every=0.6, rotate_to="app.log")
    flow.wait_for(written, timeout=90)
    flow.stop()


def test_copytruncate_with_the_copy_outside_the_glob(tmp_path: Path, logs: Path, couch: CouchDB,
                                                     couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    written = append(log, numbered("before", 0, 3000))
    # The unclosable window: lines not yet read when the file is truncated exist only in the
    # copy, which this source does not follow. Wait until they are read.
    flow.wait_for(written)
    shutil.copyfile(log, logs / "app.log.1")
    os.truncate(log, 0)
    written += append(log, numbered("after", 0, 20))
    flow.wait_for(written)
    # Truncated and at once regrown past the old offset: only the marker can tell.
    shutil.copyfile(log, logs / "app.log.2")
    with log.open("r+b") as f:
        f.truncate(0)
    written += append(log, numbered("regrown", 0, 3000))
    flow.wait_for(written)
    flow.stop()


def test_copytruncate_with_the_copy_inside_the_glob_loses_and_doubles_nothing(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "app.log*")], "exclude_paths": ["*.gz"]}).start()
    written = Counter[str]()
    for cycle in range(4):
        # No waiting for the agent: lines it has not read yet are read from the copy.
        written += append(log, numbered(f"cycle{cycle}", 0, 4000))
        shutil.copyfile(log, logs / f"app.log.{cycle + 1}")
        os.truncate(log, 0)
    (logs / "app.log.9.gz").write_bytes(b"\x1f\x8b compressed, excluded\n")
    flow.wait_for(written)
    flow.restart()
    written += append(log, numbered("after-restart", 0, 100))
    flow.wait_for(written)
    flow.stop()


def test_rewritten_in_place_with_the_same_first_line_while_stopped(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    banner = "=== log opened ==="
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    written = append(log, [banner, *numbered("old", 0, 500)])
    flow.wait_for(written)
    flow.stop()
    with log.open("r+b") as f:
        f.truncate(0)
    written += append(log, [banner, *numbered("new", 0, 2000)])
    flow.start()
    flow.wait_for(written)
    flow.stop()


def test_log4j_dated_rotation_of_real_kafka_logs(tmp_path: Path, logs: Path, couch: CouchDB,
                                                 couchdb_url: str, database: str, reallogs: Path) -> None:
    source = reallogs / "elastic-examples/kafka0/logs"
    hours = [*sorted(source.glob("server.log.2016-12-19-*")), source / "server.log"]
    log = logs / "server.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / "server.log*")]}).start()
    written: Counter[str] = Counter()
    for hour in hours:
        data = hour.read_bytes()
        with log.open("ab", buffering=0) as f:
            for start in range(0, len(data), 4096):
                f.write(data[start:start + 4096])
        written += messages_in(data)
        if hour.name != "server.log":
            # DailyRollingFileAppender: rename to the dated name, start a new file.
            os.rename(log, logs / hour.name)
    flow.wait_for(written)
    flow.stop()


def test_deleted_file_is_read_to_its_end_and_released(tmp_path: Path, logs: Path, couch: CouchDB,
                                                      couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    written = Counter[str]()
    for round_ in range(3):
        with log.open("ab", buffering=0) as f:
            for n in range(0, 6000, 200):
                lines = numbered(f"del{round_}", n, 200)
                f.write(("\n".join(lines) + "\n").encode())
                written.update(lines)
                if n == 0:
                    # A file deleted before the agent ever opened it cannot be read by anyone;
                    # this deletes one the agent is following, with lines it has not read yet.
                    first = lines[0]
                    wait_for(lambda first=first: first in flow.messages(), 30, "the file to be opened")
            os.unlink(log)  # deleted while the writer still holds it open
    flow.wait_for(written)
    wait_for(lambda: not any("(deleted)" in t for t in flow.open_fds()), 10,
             "the deleted files to be closed")
    flow.stop()


def test_inode_reuse_is_a_new_file(tmp_path: Path, logs: Path, couch: CouchDB,
                                   couchdb_url: str, database: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]}).start()
    written = append(log, numbered("first", 0, 1000))
    flow.wait_for(written)
    flow.stop()
    inode = log.stat().st_ino
    log.unlink()
    reuse_inode(log, inode)
    written += append(log, numbered("second", 0, 200))
    flow.start()
    flow.wait_for(written)
    flow.stop()
    # Stopped, so that the agent's own state writes do not take the freed inode first.
    log.unlink()
    reuse_inode(log, inode)
    written += append(log, numbered("third", 0, 300))
    flow.start()
    flow.wait_for(written)
    flow.stop()


def reuse_inode(path: Path, inode: int) -> None:
    """Create `path` with the inode number a deleted file had, as a busy file system does."""
    for attempt in range(200):
        candidate = path.with_name(f".candidate-{attempt}")
        candidate.touch()
        if candidate.stat().st_ino == inode:
            candidate.rename(path)
            return
    pytest.skip("this file system did not hand out the deleted file's inode again")


def test_files_shorter_than_the_fingerprint_window(tmp_path: Path, logs: Path, couch: CouchDB,
                                                   couchdb_url: str, database: str) -> None:
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / "*.log")]}).start()
    written = append(logs / "tiny.log", ["hi"])
    (logs / "empty.log").touch()
    with (logs / "partial.log").open("wb") as f:
        f.write(b"no newline yet")
    flow.wait_for(written)
    written += append(logs / "partial.log", ["", "second"])
    written["no newline yet"] += 1
    written += append(logs / "empty.log", ["x"])
    flow.wait_for(written)
    flow.restart()
    written += append(logs / "tiny.log", ["ho"])
    flow.wait_for(written)
    flow.stop()


def test_multiline_java_traces(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                               database: str, reallogs: Path) -> None:
    real = reallogs / "elastic-examples/kafka0/logs/controller.log.2016-12-19-18"
    log = logs / "controller.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(log)], "multiline": {"start": r"^\[\d{4}-\d{2}-\d{2} ",
                                                        "timeout": "200ms"}}).start()
    data = real.read_bytes()
    with log.open("ab", buffering=0) as f:
        for start in range(0, len(data), 1000):
            f.write(data[start:start + 1000])
    expected = Counter[str]()
    for event in data.decode().split("\n["):
        expected["[" + event if expected else event] += 1
    expected = Counter({k.rstrip("\n"): v for k, v in expected.items()})
    assert sum(expected.values()) == 803
    assert sum(v for k, v in expected.items() if "\n" in k) == 32
    flow.wait_for(expected)
    flow.stop()


def test_crlf_and_unterminated_last_lines(tmp_path: Path, logs: Path, couch: CouchDB,
                                          couchdb_url: str, database: str, reallogs: Path) -> None:
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / "*.log")]}).start()
    written = Counter[str]()
    finished = Counter[str]()
    for real in sorted((reallogs / "loghub").glob("*/*_2k.log")):
        data = real.read_bytes()
        (logs / real.name).write_bytes(data)
        written += messages_in(data)
        finished += messages_in(data, complete_only=False)
    flow.wait_for(written)
    for path in logs.glob("*.log"):
        with path.open("ab") as f:
            f.write(b"\r\n")
    flow.wait_for(finished)
    flow.stop()


def test_invalid_utf8_is_kept(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                              database: str, reallogs: Path) -> None:
    data = (reallogs / "fail2ban/testcase01.log").read_bytes()
    (logs / "f.log").write_bytes(data)
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(logs / "f.log")]}).start()
    expected = messages_in(data)
    assert any("\ufffd" in m for m in expected)
    flow.wait_for(expected)
    flow.stop()


def test_latin1_and_utf16_encodings(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                                    database: str) -> None:
    lines = ["Déc 31 café", "naïve ünïcödé", "\u0a00 gurmukhi start"]
    (logs / "latin.log").write_bytes(("\n".join(lines[:2]) + "\n").encode("latin-1"))
    (logs / "wide.log").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-16-le"))
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "latin.log")], "encoding": "latin-1"},
                    {"paths": [str(logs / "wide.log")], "encoding": "utf-16le"}).start()
    flow.wait_for(Counter(lines[:2]) + Counter(lines))
    flow.stop()


def test_a_thousand_files_at_once(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                                  database: str) -> None:
    written = Counter[str]()
    for i in range(1000):
        written += append(logs / f"f{i:04d}.log", numbered(f"file{i}", 0, 3))
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "*.log")]}).start()
    flow.wait_for(written, timeout=120)
    for i in range(0, 1000, 7):
        written += append(logs / f"f{i:04d}.log", numbered(f"more{i}", 0, 2))
    flow.wait_for(written, timeout=120)
    flow.stop()


def test_start_at_end_skips_only_what_was_there_at_first_start(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    append(logs / "old.log", numbered("old", 0, 100))
    with (logs / "old.log").open("ab") as f:
        f.write(b"partial at first start")
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "*.log")], "start_at": "end"}).start()
    written = append(logs / "new.log", numbered("new", 0, 10))
    flow.wait_for(written)
    append(logs / "old.log", ["-completed"])
    written["partial at first start-completed"] += 1
    flow.wait_for(written)
    flow.restart()
    written += append(logs / "old.log", numbered("later", 0, 5))
    flow.wait_for(written)
    flow.stop()


def test_polling_mode(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log = logs / "nfs.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(log)], "watch": "poll"}, poll_interval="100ms").start()
    written = append(log, numbered("poll", 0, 500))
    flow.wait_for(written)
    os.rename(log, logs / "nfs.log.1")
    written += append(log, numbered("poll-new", 0, 500))
    flow.wait_for(written)
    assert '"polling"' in flow.agent.log() or '"watch": "polling"' in flow.agent.log()
    flow.stop()


def test_restart_between_every_pair_of_steps(tmp_path: Path, logs: Path, couch: CouchDB,
                                             couchdb_url: str, database: str, reallogs: Path) -> None:
    """Rotation, copy-truncate, deletion, inode reuse, short files, real logs, with a restart of
    the agent (and a check) after every step."""
    log = logs / "app.log"
    written = append(log, numbered("initial", 0, 100))
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    {"paths": [str(logs / "app.log"), str(logs / "real*.log")]}).start()

    def rename_rotation() -> None:
        nonlocal written
        written += append(log, numbered(f"rename{len(written)}", 0, 2000))
        os.rename(log, logs / f"rotated.{len(written)}")
        written += append(log, numbered(f"rename-new{len(written)}", 0, 500))

    def copytruncate() -> None:
        nonlocal written
        flow.wait_for(written)
        shutil.copyfile(log, logs / "copied.1")
        os.truncate(log, 0)
        written += append(log, numbered("truncated-new", 0, 700))

    def delete() -> None:
        nonlocal written
        written += append(log, numbered("to-delete", 0, 300))
        flow.wait_for(written)
        log.unlink()
        written += append(log, numbered("after-delete", 0, 300))

    def short_file() -> None:
        nonlocal written
        (logs / "real-short.log").write_bytes(b"s\n")
        written["s"] += 1

    def real_logs() -> None:
        nonlocal written
        data = (reallogs / "fail2ban/logs/traefik-auth").read_bytes()
        (logs / "real-traefik.log").write_bytes(data)
        written += messages_in(data)

    for step in (rename_rotation, copytruncate, delete, short_file, real_logs, rename_rotation):
        step()
        flow.wait_for(written)
        flow.restart()
        flow.wait_for(written)
    flow.stop()


@pytest.mark.parametrize("start", ["beginning", "end"])
def test_corrupt_state_file_starts_where_configured(tmp_path: Path, logs: Path, couch: CouchDB,
                                                    couchdb_url: str, database: str, start: str) -> None:
    log = logs / "app.log"
    flow = pipeline(tmp_path, couch, couchdb_url, database, {"paths": [str(log)]},
                    on_corrupt_state=start).start()
    written = append(log, numbered("before", 0, 500))
    flow.wait_for(written)
    flow.stop()
    (flow.config.parent / "state" / "offsets.json").write_bytes(b"\x00not json")
    flow.start()
    written += append(log, numbered("after", 0, 100))
    flow.wait_for(written)
    time.sleep(2.5)  # the next status snapshot
    status = json.loads((flow.config.parent / "state" / "status.json").read_text())
    conflicts = status["databases"][database]["conflicts"]
    # beginning: everything is sent again and CouchDB answers conflict; end: nothing is.
    assert (conflicts == 500) if start == "beginning" else (conflicts == 0), conflicts
    assert '"state_file_corrupt"' in flow.agent.log()
    assert list((flow.config.parent / "state").glob("offsets.json.corrupt-*"))
    flow.stop()
