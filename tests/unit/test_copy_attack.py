"""Attacks on copy-truncate (issue 13): a copy written slowly, or taken away while the agent
waits for it to grow, must not be shipped again under new ids."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

import agent.tailer as tailer_module
from agent.tailer import TailerSet
from tests.unit.copies import Scene, follow_original_then_copy

CONTENT = b"".join(b"line %07d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" % n for n in range(50_000))


@pytest.mark.xfail(strict=True, reason="not fixed: the growth wait is bounded so that a new log "
                   "that shares a banner is not held back; a stalled cp outlasts it")
async def test_a_copy_whose_cp_stalls_longer_than_the_growth_wait_is_not_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp` of a big file stalls (a busy disk, a stopped process) for longer than
    COPY_GROWTH_WAIT after the scan found its first 100 KB; it then finishes, and the original
    is truncated. The copy must be adopted, not read as a new file (everything shipped again)."""
    monkeypatch.setattr(tailer_module, "COPY_GROWTH_WAIT", 0.3)
    (tmp_path / "app.log").write_bytes(CONTENT)

    def cp() -> None:
        with (tmp_path / "app.log.1").open("wb") as out:
            out.write(CONTENT[:200_000])
            out.flush()
            time.sleep(2.0)  # a stall: well past the (shortened) growth wait
            out.write(CONTENT[200_000:])

    scene = await follow_original_then_copy(tmp_path, threading.Thread(target=cp))
    assert not scene.copy_read_again(), scene.got


async def test_a_partial_copy_removed_while_waiting_to_grow_is_not_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan finds a copy while it is written; before it grows again it is removed (the
    rotation was aborted, or the copy compressed and deleted). The tailer that waits for it to
    grow must give up, as one waiting for its original does, not read the deleted copy's bytes
    (the original's, shipped already) under a new id."""
    monkeypatch.setattr(tailer_module, "COPY_GROWTH_WAIT", 2.0)  # waited out below
    scene = Scene(tmp_path)
    out = await copy_begun(scene)
    out.close()
    held = scene.copy.open("rb")  # the copy's inode outlives its name, as it does while cp holds it
    try:
        scene.copy.unlink()
        scene.scan(scene.log)
        await asyncio.sleep(tailer_module.COPY_GROWTH_WAIT + 1.0)
        await scene.finish()
    finally:
        held.close()
    assert not scene.copy_read_again(), scene.got


async def test_a_partial_copy_whose_source_is_reloaded_while_waiting_to_grow_is_not_read_again(
        tmp_path: Path) -> None:
    """A reload stops the source while a claim waits for a copy to grow: the stopping tailer
    took the copy for a new file and handed it over at offset 0, so its successor read the
    whole copy again under a new id once cp finished."""
    scene = Scene(tmp_path)
    with await copy_begun(scene) as out:
        await scene.tailers.stop_sources(["s"])
        scene.tailers.add_sources([scene.config], {"s": scene.sink}, {"s": "beginning"}, [])
        scene.scan(scene.log, scene.copy)
        await asyncio.sleep(0.3)
        out.write(CONTENT[200_000:])  # cp finishes, then copytruncate truncates the original
    scene.log.write_bytes(b"")
    scene.scan(scene.log, scene.copy)
    await scene.finish()
    assert not scene.copy_read_again(), scene.got


@pytest.mark.xfail(strict=True, reason="not fixed: a file shorter than MIN_COPY_OFFSET has no "
                   "mark a copy can be recognized by, so its copy is read as a new file")
async def test_a_copy_of_a_small_log_is_not_read_again(tmp_path: Path) -> None:
    """A quiet log (a few lines, under MIN_COPY_OFFSET bytes) rotated by copytruncate: its
    copy holds exactly the lines shipped, yet it is read as a new file and shipped again."""
    scene = Scene(tmp_path)
    content = b"".join(b"quiet line %03d\n" % n for n in range(40))  # 600 bytes
    scene.log.write_bytes(content)
    scene.scan(scene.log)
    await scene.read_log(40)
    scene.copy.write_bytes(content)
    scene.log.write_bytes(b"")  # copytruncate
    scene.scan(scene.log, scene.copy)
    await scene.finish()
    assert not scene.copy_read_again(), scene.got


async def test_an_original_truncated_while_its_copy_is_checked_is_not_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's check reads in a thread; if the original is truncated meanwhile, its tailer
    lets go of it and starts over. The copy must then adopt the original's offsets, not wait
    for that tailer to let go again (it waited for ever; CI caught it once in a run)."""
    scene = Scene(tmp_path)
    scene.log.write_bytes(CONTENT)
    is_copy = TailerSet._is_copy

    async def truncated_meanwhile(*args: object, **kwargs: object) -> bool:
        found = await is_copy(*args, **kwargs)
        if found:
            # logrotate truncates the original while the check's read is in its thread.
            scene.log.write_bytes(b"")
            scene.tailers.hint(str(scene.log))
            while scene.tailers.owners:
                await asyncio.sleep(0.01)
        return found

    monkeypatch.setattr(TailerSet, "_is_copy", staticmethod(truncated_meanwhile))
    scene.scan(scene.log)
    await scene.read_log(50_000)
    scene.copy.write_bytes(CONTENT)
    scene.scan(scene.log, scene.copy)
    await scene.finish()
    assert not scene.copy_read_again(), scene.got


async def copy_begun(scene: Scene) -> BinaryIO:
    """app.log read to its end; then its copy begun (200 KB written, the file left open as cp
    holds it), found by a scan, and its tailer's claim waiting for it to grow."""
    scene.log.write_bytes(CONTENT)
    scene.scan(scene.log)
    await scene.read_log(50_000)
    out = scene.copy.open("wb")
    out.write(CONTENT[:200_000])
    out.flush()
    scene.scan(scene.log, scene.copy)
    async with asyncio.timeout(60):  # a bound for a hang, not a timing check
        while not any(t.path == str(scene.copy) and t.fd >= 0 for t in scene.tailers.live.values()):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    return out
