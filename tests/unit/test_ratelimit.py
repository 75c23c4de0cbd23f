"""Repeated failures are logged with rate limits: the first, one summary a minute, the recovery;
for the offsets (state_save_failed) and the status snapshot (status_write_failed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from agent import config as config_module
from agent.daemon import Agent
from agent.ratelimit import RepeatedFailure
from agent.status import StatusFile
from tests.agentproc import write_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_failure_then_one_summary_a_minute_then_the_recovery() -> None:
    clock = Clock()
    failures = RepeatedFailure(structlog.get_logger("test"), "state_save_failed", clock=clock)
    with capture_logs() as logs:
        failures.succeeded(path="/s")  # working all along: nothing to say
        for second in range(150):  # failing every second for 150 s
            clock.now = 1000.0 + second
            failures.failed(path="/s", error="read-only file system")
        clock.now = 1200.0
        failures.succeeded(path="/s")
        failures.succeeded(path="/s")
    assert [(e["event"], e["log_level"], e.get("repeated")) for e in logs] == [
        ("state_save_failed", "error", None),
        ("state_save_failed", "error", 60),
        ("state_save_failed", "error", 60),
        ("state_save_recovered", "info", None),
    ]
    assert logs[0]["error"] == "read-only file system" and logs[0]["path"] == "/s"
    assert (logs[2]["failures"], logs[2]["failing_for"]) == (121, 120.0)
    assert (logs[3]["failures"], logs[3]["failed_for"]) == (150, 200.0)
    assert not failures.failing


def test_a_new_failure_after_a_recovery_is_logged_at_once() -> None:
    clock = Clock()
    failures = RepeatedFailure(structlog.get_logger("test"), "status_write_failed", clock=clock)
    with capture_logs() as logs:
        failures.failed(error="a")
        clock.now += 1
        failures.succeeded()
        clock.now += 1
        failures.failed(error="b")
    assert [(e["event"], e.get("error")) for e in logs] == [
        ("status_write_failed", "a"), ("status_write_recovered", None), ("status_write_failed", "b")]


def test_status_write_failures_never_raise_and_are_logged_once(tmp_path: Path) -> None:
    status = StatusFile(tmp_path)
    # A folder where the temp file goes: every write fails (as a full or read-only disk would).
    (tmp_path / "status.json.tmp").mkdir()
    with capture_logs() as logs:
        assert [status.write({"pid": 1}) for _ in range(5)] == [False] * 5
        (tmp_path / "status.json.tmp").rmdir()
        assert status.write({"pid": 1})
    assert [e["event"] for e in logs] == ["status_write_failed", "status_write_recovered"]
    assert logs[0]["path"] == str(tmp_path / "status.json") and "action" in logs[0]
    assert logs[1]["failures"] == 5


def test_the_agent_logs_a_failing_state_save_once_and_its_recovery(tmp_path: Path) -> None:
    config = config_module.load(write_config(
        tmp_path, "http://127.0.0.1:9", [{"name": "app", "paths": [str(tmp_path / "x.log")],
                                           "schema": "$msg...", "database": "log_app"}]))
    agent = Agent(config)
    config.state_dir.mkdir()
    (config.state_dir / "offsets.json.tmp").mkdir()

    async def save(times: int) -> None:
        for _ in range(times):
            agent.offsets.dirty = True
            await agent._save_offsets()

    with capture_logs() as logs:
        asyncio.run(save(5))
        assert agent.offsets.dirty, "a failed save is tried again at the next tick"
        (config.state_dir / "offsets.json.tmp").rmdir()
        asyncio.run(save(2))
    assert [e["event"] for e in logs] == ["state_save_failed", "state_save_recovered"]
    assert logs[1]["failures"] == 5 and (config.state_dir / "offsets.json").exists()
