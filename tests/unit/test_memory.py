"""Memory per followed file (issue 13 item 7): what a tailer and its offsets keep between reads.

With 1,000 files catching up at once, anything a tailer keeps while it waits for the shared read
budget is paid 1,000 times. These tests count what is kept, not how long anything takes.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.tailer
from agent.config import Problem, SourceConfig, source_from_mapping
from agent.offsets import OffsetStore
from agent.tailer import READ_CHUNK, Found, Tailer, TailerSet
from agent.types import FILE_START, Ack, FileId, Lines, SourceFile


def start_tailer(tailer: Tailer) -> asyncio.Task[None]:
    return asyncio.create_task(tailer.run())


def source(**keys: Any) -> SourceConfig:
    problems: list[Problem] = []
    made = source_from_mapping("s.yaml", {"name": "s", "schema": "$m...", **keys}, problems)
    assert made is not None, problems
    return made


@pytest.fixture
def traced() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def chunks_held_by_tailers() -> int:
    """Live blocks of at least half a chunk allocated in agent/tailer.py: chunks read there."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, agent.tailer.__file__)])
    return sum(1 for trace in snapshot.traces if trace.size >= READ_CHUNK // 2)


async def test_tailers_waiting_for_the_read_budget_hold_no_chunk(tmp_path: Path,
                                                                 traced: None) -> None:
    """Each tailer kept its last chunk (256 KiB) while it waited for the shared read budget,
    through the finished thread call it remembered: 1,000 files caught up in 367 MiB."""
    files = 4
    written: dict[str, list[bytes]] = {}
    for n in range(files):
        # Two chunks' worth each, so that every tailer comes back for the budget.
        lines = [f"file {n} line {i:06d} ".encode() + b"x" * 100 for i in range(3000)]
        (tmp_path / f"app-{n}.log").write_bytes(b"".join(line + b"\n" for line in lines))
        written[str(tmp_path / f"app-{n}.log")] = lines
    budget = asyncio.Semaphore(1)
    got: dict[str, list[bytes]] = {path: [] for path in written}
    held: list[int] = []

    async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        got[path].extend(lines.data)
        if len(held) < 2 * files:
            # Called with the budget held: the other tailers have read their last chunk and
            # wait for the budget again. Only the chunk handed on now is in memory.
            held.append(chunks_held_by_tailers())

    tailers = TailerSet(start_tailer, [source(paths=[str(tmp_path / "*.log")])],
                        {"s": sink}, OffsetStore(), {"s": "beginning"}, read_budget=budget)
    found = []
    for path in written:
        st = Path(path).stat()
        found.append(Found("s", path, st.st_dev, st.st_ino, st.st_size))
    tailers.reconcile(found, ["s"])
    try:
        async with asyncio.timeout(120):
            while any(len(got[path]) < len(lines) for path, lines in written.items()):
                await asyncio.sleep(0.01)
    finally:
        await tailers.stop()
    assert got == written
    assert len(held) == 2 * files
    assert max(held) <= 1, f"chunks held while handing one on, per call: {held}"


def test_an_acknowledged_file_costs_its_offsets_entry_under_a_kib(traced: None) -> None:
    """Each entry kept two deques and a set after its documents were all acknowledged, the
    deques with up to 16 freed blocks each: about 10 KiB per file after a catch-up."""
    files = [SourceFile("s", FileId(1, ino, f"{ino:016x}")) for ino in range(200)]
    store = OffsetStore()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for file in files:
        store.attach(file, f"/var/log/app-{file.file_id.ino}.log", FILE_START)
        for chunk in range(4):
            ends = [chunk * 100_000 + 100 * (i + 1) for i in range(1000)]
            store.expect(file, ends, ends[-1], f"m{ends[-1]}")
            store.acknowledge(Ack(file, end) for end in ends)
    gc.collect()
    per_file = (tracemalloc.get_traced_memory()[0] - before) / len(files)
    assert store.outstanding() == 0
    assert [store.get(f).committed for f in files] == [400_000] * len(files)  # type: ignore[union-attr]
    assert per_file < 1024, f"{per_file:.0f} bytes per acknowledged file"


async def test_a_followed_idle_file_costs_under_6_kib(tmp_path: Path, traced: None) -> None:
    """Everything following one file costs (its tailer, task and offsets entry): each tailer
    kept three asyncio Events (each with its deque of waiters), a bound logger, an instance
    dict and its last stat result while it waited for its file to grow: 8 KiB per file."""
    files = 200
    paths = [tmp_path / f"app-{n}.log" for n in range(files)]
    for n, path in enumerate(paths):
        path.write_bytes(f"file {n} starts\nand goes on\n".encode())
    got: list[bytes] = []

    async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        got.extend(lines.data)

    offsets = OffsetStore()
    tailers = TailerSet(start_tailer, [source(paths=[str(tmp_path / "*.log")])],
                        {"s": sink}, offsets, {"s": "beginning"})
    found = []
    for path in paths:
        st = path.stat()
        found.append(Found("s", str(path), st.st_dev, st.st_ino, st.st_size))
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    try:
        tailers.reconcile(found, ["s"])
        async with asyncio.timeout(60):
            while len(got) < 2 * files or any(t._in_flight for t in tailers.live.values()):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # every tailer back in its wait
        gc.collect()
        per_file = (tracemalloc.get_traced_memory()[0] - before) / files
    finally:
        await tailers.stop()
    assert sorted(got) == sorted(line for n in range(files)
                                 for line in (f"file {n} starts".encode(), b"and goes on"))
    assert per_file < 6 * 1024, f"{per_file:.0f} bytes per followed file"
