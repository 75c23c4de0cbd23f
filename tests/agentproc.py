"""Run the real `agent` command as a child process, as systemd would, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def write_config(folder: Path, couchdb_url: str, sources: list[dict[str, Any]],
                 **main: Any) -> Path:
    """Write agent.yaml and one conf.d file per source under `folder`; return the main file."""
    (folder / "conf.d").mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "couchdb": {"url": couchdb_url, "request_timeout": "10s"},
        "state_dir": str(folder / "state"),
        "shipping": {"linger": "50ms", "retry_max_backoff": "1s"},
        "scan_interval": "1s",
        "log": {"format": "json", "level": "info"},
    }
    for key, value in main.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(settings))
    for source in sources:
        (folder / "conf.d" / f"{source['name']}.yaml").write_text(yaml.safe_dump(source))
    return path


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class AgentProcess:
    """`python -m agent run -c CONFIG`, with its log captured to a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_mark = 0

    def start(self) -> AgentProcess:
        self._log_mark = len(self.log())
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
            stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until the agent logged `agent_started` (its first scan is done) since the last start."""
        wait_for(lambda: '"agent_started"' in self.log()[self._log_mark:] or not self.running(),
                 timeout, "the agent to start")
        assert self.running(), f"the agent exited at start:\n{self.log()[self._log_mark:]}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as systemd stops it; return the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"agent did not stop within {timeout}s; log:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self.kill()
