"""systemd's notify protocol: READY, STATUS, RELOADING, STOPPING and WATCHDOG datagrams.

The agent runs under `Type=notify`; systemd gives it `NOTIFY_SOCKET` (a path,
or an abstract socket when it starts with `@`) and, with `WatchdogSec=`,
`WATCHDOG_USEC` (and `WATCHDOG_PID`). Without `NOTIFY_SOCKET` every call is a
no-op, so the same code runs in a terminal, a container or a test. A failed
send is logged and never stops anything: notification is advice to the service
manager, and the agent's work must not depend on it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("agent.notify")


class SystemdNotifier:
    """Sends sd_notify messages to the socket systemd named, if it named one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' and addressed with a leading NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)
        """Seconds between the pings systemd expects (half of WatchdogSec), or None."""
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ match this with the reload it asked for; older
        # versions ignore the field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            # Once per run: a vanished socket would otherwise log on every tick.
            if not self._failed:
                self._failed = True
                log.warning("systemd_notify_failed", error=str(exc),
                            action="systemd may restart the agent if WatchdogSec is set; "
                            "check NOTIFY_SOCKET and NotifyAccess= in the unit")
            return
        if self._failed:
            self._failed = False
            log.info("systemd_notify_recovered")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout, as sd_watchdog_enabled() advises; None if it is off or is meant
    for another process (WATCHDOG_PID names the one process that must ping)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 2e6
