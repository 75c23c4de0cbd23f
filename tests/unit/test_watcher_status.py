"""Discovery (globs, exclusions, the inotify-to-polling fallback) and `agent status` rendering."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import watcher as watcher_module
from agent.status import EXIT_CRITICAL, EXIT_NOT_RUNNING, EXIT_OK, render
from agent.tailer import Found, Skipped
from agent.watcher import Watcher, excluded, scan, watch_roots
from tests.unit.sources import source


def test_scan_follows_globs_and_exclusions(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("a/x.log", "a/x.log.1", "a/x.log.2.gz", "y.log"):
        (tmp_path / name).write_text("line\n")
    found, skipped = scan([source(paths=[str(tmp_path / "**" / "*.log*")], exclude_paths=["*.gz"])])
    assert skipped == []
    assert sorted(Path(f.path).relative_to(tmp_path).as_posix() for f in found) == [
        "a/x.log", "a/x.log.1", "y.log"]
    assert all(f.size == 5 for f in found)
    assert excluded("/var/log/app/x.gz", ["*.gz"]) and excluded("/var/log/app/x", ["/var/log/app/*"])


def test_watch_roots_use_the_fixed_part_of_each_glob(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    assert watch_roots([str(tmp_path / "logs" / "*.log")]) == {str(tmp_path / "logs"): False}
    assert watch_roots([str(tmp_path / "**" / "x.log")]) == {str(tmp_path): True}
    assert watch_roots([str(tmp_path / "later" / "x.log")]) == {str(tmp_path): True}


class Tailers:
    def __init__(self) -> None:
        self.scans: list[tuple[list[Found], list[str]]] = []

    def reconcile(self, found: list[Found], scanned: list[str], skipped: list[Skipped]) -> None:
        self.scans.append((found, scanned))

    def hint(self, path: str) -> None:
        pass


class NoWatches:
    def start(self) -> None:
        raise OSError(28, "inotify watch limit reached")

    def stop(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass


async def test_falls_back_to_polling_when_inotify_cannot_be_had(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher_module, "Observer", NoWatches)
    (tmp_path / "x.log").write_text("a\n")
    tailers = Tailers()
    watcher = Watcher([source(paths=[str(tmp_path / "x.log")])], tailers, scan_interval=60,
                      poll_interval=0.05)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await watcher.start()
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.3)
        task.cancel()
    assert watcher.mode == "polling"
    assert next(e for e in logs if e["event"] == "inotify_unavailable")["mode"] == "polling"
    assert len(tailers.scans) >= 3, "polling rescans every poll_interval"


def snapshot(**database: Any) -> dict[str, Any]:
    counters = dict.fromkeys(("lines", "matched", "unmatched", "filtered", "empty",
                              "invalid_encoding", "truncated"), 0)
    return {"pid": os.getpid(), "started_at": time.time() - 100, "updated_at": time.time(),
            "watch": "inotify",
            "sources": {"app": {"counters": counters, "files": 1, "lag": 2048,
                                "behind": [{"path": "/x", "lag": 2048}]}},
            "databases": {"log_app": {"healthy": True, "queued": 0, "spool_records": 0,
                                      "spool_bytes": 0, "stored": 5, "conflicts": 0,
                                      "dead_lettered": 0, "last_error": None,
                                      "last_success": time.time(), "backpressure": False,
                                      "spool": {"dropped_records": 0}, **database}}}


def test_status_says_healthy_and_how_far_behind() -> None:
    text, code = render(snapshot(), Path("/s"))
    assert code == EXIT_OK and "health: OK" in text and "2.0 KiB unread in /x" in text


def test_status_says_what_is_wrong() -> None:
    text, code = render(snapshot(healthy=False, last_error="unreachable: refused",
                                 backpressure=True, spool_records=9), Path("/s"))
    assert code == EXIT_CRITICAL  # the spool full, reading paused
    assert "log_app: unreachable: refused" in text and "spool full, reading paused" in text


def test_status_of_a_stopped_agent() -> None:
    assert render(None, Path("/s"))[1] == EXIT_NOT_RUNNING
    stale = snapshot()
    stale["updated_at"] -= 60
    text, code = render(stale, Path("/s"))
    assert code == EXIT_NOT_RUNNING and "last status 60s ago" in text
