"""The tailer's I/O shell against real files: the agent's own state is never followed, and a
descriptor is never closed under a read still running in a thread."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.config import Problem, SourceConfig, source_from_mapping
from agent.offsets import OffsetStore
from agent.tailer import Found, Tailer, TailerSet
from agent.types import Lines, SourceFile
from agent.watcher import scan


def source(**keys: Any) -> SourceConfig:
    problems: list[Problem] = []
    made = source_from_mapping("s.yaml", {"name": "s", "schema": "$m...", **keys}, problems)
    assert made is not None, problems
    return made


def test_scan_never_follows_a_file_in_the_state_dir(tmp_path: Path) -> None:
    """Issue 9 item 4: `paths: ['/var/lib/couchlog/**']` shipped every offsets.json write."""
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    (state / "offsets.json").write_text("{}\n")
    (state / "spool" / "000001.seg").write_text("x\n")
    (tmp_path / "app.log").write_text("line\n")
    (tmp_path / "state-link").symlink_to(state)
    for state_dir in (state, tmp_path / "state-link"):
        found, skipped = scan([source(paths=[str(tmp_path / "**")])], state_dir)
        assert [f.path for f in found] == [str(tmp_path / "app.log")]
        reasons = {Path(s.path).relative_to(tmp_path).as_posix(): s.reason for s in skipped}
        assert reasons["state/offsets.json"] == "inside the agent's state_dir"
        assert reasons["state/spool/000001.seg"] == "inside the agent's state_dir"


async def test_stopping_waits_for_a_read_in_flight(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 8: a cancelled `to_thread` keeps running; the tailer's descriptor was
    closed under it (the read then failed with EBADF, or read another file that took the
    descriptor number)."""
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\n")
    entered, gate, finished = threading.Event(), threading.Event(), threading.Event()
    seen: list[object] = []
    read_chunk = Tailer._read_chunk

    def slow_read(self: Tailer) -> bytes | None:
        entered.set()
        gate.wait(30)
        try:
            os.fstat(self.fd)
            seen.append("descriptor open")
            return read_chunk(self)
        except OSError as exc:
            seen.append(exc.errno)
            raise
        finally:
            finished.set()

    monkeypatch.setattr(Tailer, "_read_chunk", slow_read)

    async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        pass

    offsets = OffsetStore()
    tailers = TailerSet(asyncio.create_task, [source(paths=[str(log)])], {"s": sink}, offsets,
                        {"s": "beginning"})
    st = log.stat()
    tailers.reconcile([Found("s", str(log), st.st_dev, st.st_ino, st.st_size)], ["s"])
    assert await asyncio.to_thread(entered.wait, 30)
    stopping = asyncio.create_task(tailers.stop())
    # Long enough for a stop that does not wait to close the descriptor; not a timing check.
    await asyncio.wait({stopping}, timeout=0.5)
    gate.set()
    await stopping
    assert await asyncio.to_thread(finished.wait, 30)
    assert seen == ["descriptor open"]
    assert not tailers.live and not tailers.tasks
