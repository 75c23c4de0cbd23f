"""systemd's notify protocol end to end: the real agent talks to a NOTIFY_SOCKET made here."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as config_module
from agent.daemon import Agent
from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB
from tests.integration.harness import append, numbered

pytestmark = pytest.mark.integration


class NotifySocket:
    """A unix datagram socket standing in for systemd's, collecting what the agent sends."""

    def __init__(self) -> None:
        # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
        self.folder = tempfile.mkdtemp(prefix="notify-")
        self.path = os.path.join(self.folder, "s")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> None:
        """Take every datagram waiting (and any arriving within 0.2 s)."""
        while True:
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    def seen(self, key: str) -> list[dict[str, str]]:
        self.receive()
        return [m for m in self.messages if key in m]

    def close(self) -> None:
        self.socket.close()
        os.unlink(self.path)
        os.rmdir(self.folder)


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
        notify: NotifySocket) -> None:
    config = write_config(tmp_path / "etc", couchdb_url, [
        {"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
         "schema": "$msg..."}])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: bool(notify.seen("READY")), 30, "READY=1")
        ready = notify.seen("READY")
        assert len(ready) == 1 and ready[0]["READY"] == "1"
        assert ready[0]["STATUS"].startswith("COUCHLOG OK - 0 files")
        assert "\n" not in ready[0]["STATUS"] and " | " not in ready[0]["STATUS"]
        wait_for(lambda: len(notify.seen("WATCHDOG")) >= 2, 30, "watchdog pings")
        assert all(m == {"WATCHDOG": "1"} for m in notify.seen("WATCHDOG"))
        # A new file changes the summary: STATUS= says so, alone in its datagram.
        expected = append(tmp_path / "app.log", numbered("app", 0, 10))
        wait_for(lambda: couch.count(database) == sum(expected.values()), 60, "the documents")
        wait_for(lambda: any(m["STATUS"].startswith("COUCHLOG OK - 1 files")
                             for m in notify.seen("STATUS") if "READY" not in m),
                 30, "STATUS= with the new file")
        # A reload (systemd's ExecReload= sends SIGHUP): RELOADING=1, then READY=1 again.
        assert agent.process is not None
        agent.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(notify.seen("READY")) == 2, 30, "READY=1 after the reload")
        reloading = notify.seen("RELOADING")
        assert len(reloading) == 1 and reloading[0]["RELOADING"] == "1"
        assert int(reloading[0]["MONOTONIC_USEC"]) > 0
        order = [m for m in notify.messages if "RELOADING" in m or "READY" in m]
        assert ["READY" in order[0], "RELOADING" in order[1], "READY" in order[2]] == [True] * 3
        assert agent.stop() == 0
    notify.receive()
    stopping = [i for i, m in enumerate(notify.messages) if "STOPPING" in m]
    assert len(stopping) == 1 and notify.messages[stopping[0]] == {"STOPPING": "1"}
    # Nothing claims the agent is alive once it said it stops.
    assert not [m for m in notify.messages[stopping[0]:] if "WATCHDOG" in m or "READY" in m]


async def test_a_stuck_main_loop_stops_the_watchdog_pings(
        tmp_path: Path, couchdb_url: str, database: str, notify: NotifySocket) -> None:
    """The tick hangs on a status write (a hung disk) while the event loop itself still runs:
    no WATCHDOG=1 until the tick goes on, so systemd would restart the agent."""
    config = config_module.load(write_config(tmp_path / "etc", couchdb_url, [
        {"name": "app", "database": database, "paths": [str(tmp_path / "*.log")],
         "schema": "$msg..."}]))
    agent = Agent(config)
    write = agent.status_file.write
    hang, stuck, release = threading.Event(), threading.Event(), threading.Event()

    def hanging_write(snapshot: dict[str, object]) -> bool:
        if hang.is_set() and not release.is_set():
            stuck.set()
            release.wait(60)
        return write(snapshot)

    agent.status_file.write = hanging_write  # type: ignore[method-assign]
    loop_alive = 0

    async def count_loop_turns() -> None:
        nonlocal loop_alive
        while True:
            await asyncio.sleep(0.05)
            loop_alive += 1

    running = asyncio.create_task(agent.run())
    counter = asyncio.create_task(count_loop_turns())
    async def pings() -> int:
        return len(await asyncio.to_thread(notify.seen, "WATCHDOG"))

    try:
        deadline = time.monotonic() + 30
        while await pings() < 2:
            assert time.monotonic() < deadline, "no watchdog pings from a healthy agent"
        hang.set()
        while not stuck.is_set():
            await asyncio.sleep(0.1)
        pings_before = await pings()
        before_loop = loop_alive
        await asyncio.sleep(3)  # three ticks' time: the loop turns, the main loop does not
        assert await pings() == pings_before
        assert loop_alive > before_loop
        release.set()
        deadline = time.monotonic() + 30
        while await pings() == pings_before:
            assert time.monotonic() < deadline, "the pings did not come back"
    finally:
        release.set()
        agent.handle_exit(signal.SIGTERM)
        await running
        counter.cancel()
