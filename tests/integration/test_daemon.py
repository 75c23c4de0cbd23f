"""The daemon as a whole: one file's failure stays that file's, startup failures exit 3 with
a clear message, shutdown waits for work in threads, and every line of a JSON log is JSON."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from structlog.testing import capture_logs

from agent import config as config_module
from agent.daemon import Agent
from agent.offsets import OffsetStore
from agent.queue import DocumentQueue
from agent.spool import Spool
from agent.status import EXIT_DEGRADED, EXIT_OK, render
from backend.pouchdb_server import free_port
from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.harness import append, numbered

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def keep_writing(folder: Path, stop: threading.Event) -> None:
    """Create, write and delete files in `folder` until `stop` is set: a stream of inotify events."""
    n = 0
    while not stop.is_set():
        path = folder / f"busy-{n % 20}.txt"
        path.write_bytes(b"x\n")
        path.unlink()
        n += 1


def json_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The log's lines parsed as JSON objects, and the lines that are not."""
    events, other = [], []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if isinstance(value, dict):
            events.append(value)
        else:
            other.append(line)
    return events, other


def test_every_line_of_the_json_log_is_json_through_shutdown(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log_path = tmp_path / "app.log"
    expected = append(log_path, numbered("app", 0, 200))
    config = write_config(tmp_path / "etc", couchdb_url, [
        {"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
         "schema": "$msg..."}])
    agent = AgentProcess(config)
    with agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= sum(expected.values()), 60, "the documents")
        # Files written all through the stop keep watchdog's thread busy while it is stopped.
        stop = threading.Event()
        writer = threading.Thread(target=keep_writing, args=(tmp_path, stop))
        writer.start()
        try:
            time.sleep(0.5)
            assert agent.stop() == 0, agent.log()
        finally:
            stop.set()
            writer.join()
    events, not_json = json_lines(agent.log())
    assert not not_json, f"lines of the JSON log that are not JSON objects: {not_json[:5]}"
    assert events[-1]["event"] == "agent_stopped"


@pytest.fixture
def nobody_folder() -> Iterator[Path]:
    """A folder that user nobody can read (pytest's tmp_path is root's alone)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the agent as nobody")
    folder = Path(tempfile.mkdtemp(prefix="couchlog-nobody-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_unwritable_state_dir_exits_3_with_what_to_do_and_no_traceback(nobody_folder: Path) -> None:
    log_path = nobody_folder / "app.log"
    append(log_path, numbered("app", 0, 10))
    config = write_config(nobody_folder / "etc", f"http://127.0.0.1:{free_port()}", [
        {"name": "app", "database": "logs", "paths": [str(log_path)], "schema": "$msg..."}])
    for folder in (nobody_folder / "etc", nobody_folder / "etc" / "conf.d"):
        folder.chmod(0o755)
    state = nobody_folder / "etc" / "state"
    state.mkdir(mode=0o755)  # root's: nobody cannot write there
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "agent", "run", "-c", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    events, not_json = json_lines(result.stderr)
    assert not not_json, result.stderr
    failed = [e for e in events if e["event"] == "agent_failed"]
    assert len(failed) == 1, result.stderr
    assert "Permission denied" in failed[0]["error"] and str(state) in failed[0]["error"]
    assert "writable" in failed[0]["action"] and failed[0]["started"] is False


async def eventually(condition: Callable[[], bool], timeout: float, what: str,
                     run: asyncio.Task[None]) -> None:
    """Wait (without blocking the loop the agent runs in) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert not run.done(), f"the agent stopped while waiting for {what}: {run!r}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.2)


def messages(couch: CouchDB, database: str) -> Counter[str]:
    return Counter(str(doc["msg"]) for doc in couch.docs(database))


def holds_at_least(couch: CouchDB, database: str, expected: Counter[str]) -> bool:
    return couch.count(database) >= sum(expected.values())


def through(proxy: FaultProxy, couchdb_url: str) -> str:
    """`couchdb_url` with its credentials, pointed at the proxy."""
    parts = urlsplit(couchdb_url)
    auth = f"{parts.username}:{parts.password}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{proxy.port}", parts.path, "", ""))


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


async def test_a_failing_file_is_retried_while_the_others_ship(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    broken_path, good_path = tmp_path / "broken.log", tmp_path / "good.log"
    broken = append(broken_path, numbered("broken", 0, 12000))  # several read chunks
    good = append(good_path, numbered("good", 0, 2000))
    config = config_module.load(write_config(tmp_path / "etc", couchdb_url, [
        {"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
         "schema": "$msg...", "rotate_wait": "300ms"}]))

    # Reads of broken.log past its first 300 KB fail with EIO (a bad disk, a stale NFS
    # handle) until the test repairs it: the failure comes in the middle of the file.
    real_pread = os.pread
    repaired = threading.Event()

    def pread(fd: int, length: int, offset: int) -> bytes:
        if offset + length > 300_000 and not repaired.is_set() and fd_path(fd) == str(broken_path):
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    agent = Agent(config)
    key = ("file", "app", str(broken_path))
    with capture_logs() as logged:
        run = asyncio.create_task(agent.run())
        await eventually(lambda: sum(e["event"] == "tailer_failed" for e in logged) >= 2,
                         60, "the broken file to fail twice (a retry failed too)", run)
        # Everything else keeps going: more lines for the good file, all shipped exactly.
        good += append(good_path, numbered("good", 2000, 1000))
        await eventually(lambda: messages(couch, database) & good == good, 90,
                         "every line of the good file", run)
        stored = messages(couch, database)
        assert stored - broken - good == Counter(), "documents no line was written for"
        assert stored & good == good
        assert stored & broken, "the lines before the failure were shipped"
        assert key in agent.failures
        text, code = render(agent.status(), Path("status.json"))
        assert code == EXIT_DEGRADED and str(broken_path) in text and "Input/output error" in text

        repaired.set()
        everything = broken + good
        await eventually(lambda: holds_at_least(couch, database, everything), 120,
                         "every line of both files", run)
        await eventually(lambda: not agent.failures, 30, "the broken file to count as recovered", run)
        assert render(agent.status(), Path("status.json"))[1] == EXIT_OK
        agent.handle_exit()
        await run
    stored = messages(couch, database)
    assert stored == everything, (f"missing {sum((everything - stored).values())}, "
                                  f"extra {sum((stored - everything).values())}")
    failed = [e for e in logged if e["event"] == "tailer_failed"]
    assert failed and all(e["path"] == str(broken_path) and "Input/output error" in e["error"]
                          for e in failed)
    assert [e["retry_in"] for e in failed][:2] == [1.0, 2.0]
    assert any(e["event"] == "tailer_recovered" for e in logged)


async def test_shutdown_waits_for_reads_in_threads_before_closing_the_spools(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log_path = tmp_path / "app.log"
    expected = append(log_path, numbered("app", 0, 100))
    config = config_module.load(write_config(tmp_path / "etc", couchdb_url, [
        {"name": "app", "database": database, "paths": [str(log_path)], "schema": "$msg..."}]))
    real_pread, real_close = os.pread, Spool.close
    slow, in_read = threading.Event(), threading.Event()
    order: list[str] = []

    def pread(fd: int, length: int, offset: int) -> bytes:
        if slow.is_set() and fd_path(fd) == str(log_path):
            slow.clear()
            in_read.set()
            time.sleep(1.5)  # a read on a slow disk, in its thread, while the agent stops
            order.append("read finished")
        return real_pread(fd, length, offset)

    def close(spool: Spool) -> None:
        order.append("spool closed")
        real_close(spool)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(Spool, "close", close)
    agent = Agent(config)
    run = asyncio.create_task(agent.run())
    await eventually(lambda: holds_at_least(couch, database, expected), 60, "the documents", run)
    slow.set()
    append(log_path, numbered("app", 100, 10))
    await eventually(in_read.is_set, 30, "a read to start", run)
    agent.handle_exit()
    await run
    assert order == ["read finished", "spool closed"]


async def test_shutdown_deadline_cancels_what_is_left_with_a_reason_and_loses_nothing(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    log_path = tmp_path / "app.log"
    expected = append(log_path, numbered("app", 0, 500))
    with FaultProxy(couchdb_url) as proxy:
        proxy.set("stall")  # CouchDB takes the request and never answers
        config = config_module.load(write_config(
            tmp_path / "etc", through(proxy, couchdb_url),
            [{"name": "app", "database": database, "paths": [str(log_path)], "schema": "$msg..."}],
            shutdown_timeout="1s"))
        agent = Agent(config)
        with capture_logs() as logged:
            run = asyncio.create_task(agent.run())
            await eventually(lambda: proxy.requests > 0, 30, "a request to CouchDB", run)
            agent.handle_exit()
            await run
        events = [e["event"] for e in logged]
        assert events.index("shutdown_deadline") < events.index("tasks_cancelled") < \
            events.index("agent_stopped")
        cancelled = next(e for e in logged if e["event"] == "tasks_cancelled")
        assert cancelled["count"] == 1 and "shutdown_timeout" in cancelled["reason"]

        proxy.set("pass")
        again = Agent(config)
        run = asyncio.create_task(again.run())
        await eventually(lambda: holds_at_least(couch, database, expected), 60, "the documents", run)
        again.handle_exit()
        await run
    assert messages(couch, database) == expected


async def test_a_failing_shipper_is_restarted_and_delivers_everything(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log_path = tmp_path / "app.log"
    expected = append(log_path, numbered("app", 0, 300))
    config = config_module.load(write_config(
        tmp_path / "etc", couchdb_url,
        [{"name": "app", "database": database, "paths": [str(log_path)], "schema": "$msg..."}],
        shipping={"batch_max_docs": 50}))
    real_acknowledge = OffsetStore.acknowledge
    calls = Counter[str]()

    def acknowledge(store: OffsetStore, acks: Any) -> None:
        calls["acks"] += 1
        if calls["acks"] == 2:  # a bug in the offsets, once: the shipper's loop sees a KeyError
            raise KeyError("app/0.0.injected")
        real_acknowledge(store, acks)

    monkeypatch.setattr(OffsetStore, "acknowledge", acknowledge)
    agent = Agent(config)
    part = ("shipper", database)
    with capture_logs() as logged:
        run = asyncio.create_task(agent.run())
        await eventually(lambda: any(e["event"] == "shipper_failed" for e in logged), 60,
                         "the shipper to fail", run)
        assert part in agent.failures
        text, code = render(agent.status(), Path("status.json"))
        assert code == EXIT_DEGRADED and "KeyError" in text and database in text
        expected += append(log_path, numbered("app", 300, 200))
        await eventually(lambda: holds_at_least(couch, database, expected), 60, "the documents", run)
        await eventually(lambda: part not in agent.failures, 60, "the shipper to count as recovered",
                         run)
        agent.handle_exit()
        await run
    assert messages(couch, database) == expected
    failed = next(e for e in logged if e["event"] == "shipper_failed")
    assert failed["database"] == database and "KeyError" in failed["error"]
    assert any(e["event"] == "shipper_recovered" for e in logged)


async def test_files_catching_up_hold_at_most_the_read_budget_in_parsed_chunks(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    files = 10
    for n in range(files):
        append(tmp_path / f"app-{n}.log", numbered(f"file {n}", 0, 3000))
    # Documents parsed from a chunk and waiting for room in the queue, per tailer.
    waiting = Counter[str]()
    real_put = DocumentQueue.put

    async def put(queue: DocumentQueue, docs: Any) -> None:
        waiting["now"] += 1
        waiting["most"] = max(waiting["most"], waiting["now"])
        try:
            await real_put(queue, docs)
        finally:
            waiting["now"] -= 1

    monkeypatch.setattr(DocumentQueue, "put", put)
    with FaultProxy(couchdb_url) as proxy:
        proxy.set("stall")  # CouchDB slow to the point of never answering: the queue fills up
        config = config_module.load(write_config(
            tmp_path / "etc", through(proxy, couchdb_url),
            [{"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
              "schema": "$msg..."}],
            shipping={"queue_max_docs": 100}, shutdown_timeout="1s"))
        agent = Agent(config)
        run = asyncio.create_task(agent.run())
        budget = 2  # agent.daemon.READ_BUDGET_CHUNKS

        def settled() -> bool:
            """Over the budget (the failure), or every tailer is either blocked with a parsed
            chunk or waiting for the budget, holding none."""
            if waiting["most"] > budget:
                return True
            waiters = len(getattr(getattr(agent, "read_budget", None), "_waiters", None) or ())
            return (
                waiting["now"] == budget and waiters == files - budget)

        await eventually(settled, 60, "every tailer to block", run)
        agent.handle_exit()
        await run
    assert waiting["most"] <= budget, (
        f"{waiting['most']} tailers held parsed chunks at once (the read budget is {budget})")
