"""sd_notify messages arrive on a real datagram socket, path or abstract, as systemd reads them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.notify import SystemdNotifier


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@couchlog-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name[1:])
    sock.settimeout(5)
    yield name, sock
    sock.close()


def test_messages_reach_the_socket(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": name})
    notifier.ready("3 files, 0 B behind")
    notifier.status("reloading configuration")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()
    got = [sock.recv(4096).decode() for _ in range(5)]
    notifier.close()
    assert got[0] == "READY=1\nSTATUS=3 files, 0 B behind"
    assert got[1] == "STATUS=reloading configuration"
    assert got[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert got[3:] == ["WATCHDOG=1", "STOPPING=1"]


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # no socket, no error


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(mine).watchdog_interval == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(other).watchdog_interval is None
    assert SystemdNotifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with capture_logs() as logs:
        for _ in range(3):
            notifier.watchdog()
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
