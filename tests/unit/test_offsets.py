"""The contiguous-ack rule and the atomic, versioned state file."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.offsets import MIN_COPY_OFFSET, OffsetStore, SaveBarrier, StateFile
from agent.types import FILE_START, Ack, Checkpoint, FileId, SourceFile

A = SourceFile("s", FileId(1, 2, "aaaa"))
B = SourceFile("s", FileId(1, 3, "bbbb"))


def store_with(*files: SourceFile) -> OffsetStore:
    store = OffsetStore()
    for f in files:
        store.attach(f, f"/log/{f.file_id.ino}", FILE_START)
    return store


def committed(store: OffsetStore, f: SourceFile) -> int | None:
    progress = store.get(f)
    return None if progress is None else progress.committed


def expect(store: OffsetStore, f: SourceFile, ends: list[int], read_to: int) -> None:
    store.expect(f, ends, read_to, f"m{read_to}")


def test_offset_moves_only_past_the_contiguous_acknowledged_run() -> None:
    store = store_with(A)
    expect(store, A, [10, 20, 30], 30)
    store.acknowledge([Ack(A, 20), Ack(A, 30)])
    assert committed(store, A) == 0
    store.acknowledge([Ack(A, 10)])
    assert committed(store, A) == 30
    assert store.outstanding() == 0
    progress = store.get(A)
    assert progress is not None and progress.checkpoint == Checkpoint(30, 30, "m30")


def test_marker_follows_the_last_read_position_that_is_fully_acknowledged() -> None:
    store = store_with(A)
    expect(store, A, [10, 20], 20)
    expect(store, A, [30, 40], 40)
    store.acknowledge([Ack(A, 10), Ack(A, 20), Ack(A, 30)])
    progress = store.get(A)
    assert progress is not None
    assert progress.checkpoint == Checkpoint(30, 20, "m20")


def test_lines_without_documents_count_as_acknowledged() -> None:
    store = store_with(A)
    expect(store, A, [], 50)
    assert committed(store, A) == 50
    expect(store, A, [60], 90)
    assert committed(store, A) == 50
    store.acknowledge([Ack(A, 60)])
    assert committed(store, A) == 90


def test_files_are_independent() -> None:
    store = store_with(A, B)
    expect(store, A, [5], 5)
    expect(store, B, [7], 7)
    store.acknowledge([Ack(B, 7)])
    assert (committed(store, A), committed(store, B)) == (0, 7)


def test_acks_for_unknown_files_are_ignored() -> None:
    store = store_with(A)
    store.acknowledge([Ack(B, 10)])
    assert committed(store, B) is None


def test_prune_forgets_only_released_old_files() -> None:
    store = store_with(A, B)
    store.detach(A, FILE_START)
    store.files[A].updated = 0
    store.files[B].updated = 0
    assert store.prune(older_than=100) == [A]
    assert list(store.files) == [B]


def test_state_file_round_trip(tmp_path: Path) -> None:
    store = store_with(A)
    expect(store, A, [], 123)
    state = StateFile(tmp_path)
    assert store.dirty
    state.save(store.snapshot())
    assert not store.dirty
    loaded, status = state.load()
    assert status == "ok"
    assert loaded[A].committed == 123 and loaded[A].path == "/log/2"
    assert loaded[A].checkpoint == Checkpoint(123, 123, "m123")
    assert not (tmp_path / "offsets.json.tmp").exists()


def test_a_complete_temp_file_wins_over_the_older_state(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    store = store_with(A)
    state.save(store.snapshot())
    expect(store, A, [], 99)
    (tmp_path / "offsets.json.tmp").write_text(json.dumps(store.snapshot()))
    assert state.load()[0][A].committed == 99
    assert not (tmp_path / "offsets.json.tmp").exists()


def test_a_torn_temp_file_is_ignored(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    store = store_with(A)
    expect(store, A, [], 7)
    state.save(store.snapshot())
    (tmp_path / "offsets.json.tmp").write_text('{"version": 1, "fi')
    assert state.load()[0][A].committed == 7


@pytest.mark.parametrize("content", [
    b"", b"\x00\x01garbage", b'{"version": 99, "files": {}}', b'{"version": 1, "files": {"x": {}}}',
    b"[1,2]", b'{"version": 1, "files": {"s/1.2.ab": {"path": "/x", "offset": 5, "updated": 1, '
    b'"marker_offset": 9, "marker": null}}}'])
def test_corrupt_state_is_moved_aside_and_reported(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "offsets.json").write_bytes(content)
    with capture_logs() as logs:
        assert StateFile(tmp_path).load() == ({}, "corrupt")
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["state_file_unreadable",
                                                                      "state_file_corrupt"]
    aside = [p for p in os.listdir(tmp_path) if p.startswith("offsets.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == content
    assert not (tmp_path / "offsets.json").exists()


def test_no_state_file_is_a_first_start(tmp_path: Path) -> None:
    assert StateFile(tmp_path).load() == ({}, "absent")


def test_new_generation_is_the_latest_and_copies_are_found() -> None:
    store = store_with(A)
    rewritten = SourceFile("s", A.file_id.next_generation())
    assert store.latest(SourceFile("s", FileId(1, 2, "aaaa"))) == A
    store.attach(rewritten, "/log/2", FILE_START)
    assert store.latest(A) == rewritten
    copy = SourceFile("s", FileId(1, 99, "aaaa"))
    assert set(store.copies_of(copy)) == {A, rewritten}
    assert store.copies_of(SourceFile("other", FileId(1, 99, "aaaa"))) == []


def test_copytruncate_race_the_copy_adopts_first() -> None:
    """Issue 13 item 8: the copy adopted the original's offsets; then the truncated original
    starts again with the same first line and is attached as a new generation. The copy's
    entry must survive (it raised KeyError in `expect`)."""
    store = store_with(A)
    expect(store, A, [], 3000)
    store.detach(A, Checkpoint.at(3000, "m3000"))  # the original was truncated
    store.attach(A, "/log/app.log.1", Checkpoint(3000, 3000, "m3000"))  # the copy adopts it
    store.attach(SourceFile("s", A.file_id.next_generation()), "/log/2", FILE_START)
    expect(store, A, [3100], 3100)
    store.acknowledge([Ack(A, 3100)])
    assert committed(store, A) == 3100


def test_copytruncate_race_the_original_restarts_first() -> None:
    """The other order: the truncated original is attached as a new generation before the
    copy looks for what it is a copy of. The original's offsets must still be there to adopt,
    or the copy is shipped again under new ids."""
    store = store_with(A)
    expect(store, A, [], 3000)
    store.detach(A, Checkpoint.at(3000, "m3000"))
    store.attach(SourceFile("s", A.file_id.next_generation()), "/log/2", FILE_START)
    copy = SourceFile("s", FileId(1, 99, "aaaa"))
    assert A in store.copies_of(copy)
    progress = store.get(A)
    assert progress is not None and progress.checkpoint == Checkpoint(3000, 3000, "m3000")
    assert progress.read == Checkpoint(3000, 3000, "m3000")


def test_settle_and_rewind_for_a_lost_spool() -> None:
    store = store_with(A, B)
    expect(store, A, [], 100)
    store.settle(["s"])
    expect(store, A, [150], 150)
    store.acknowledge([Ack(A, 150)])  # only spooled, say
    expect(store, B, [], 40)
    assert committed(store, A) == 150
    assert store.rewind(["s"]) == [A, B]
    assert committed(store, A) == 100 and committed(store, B) == 0
    progress = store.get(A)
    assert progress is not None and progress.checkpoint == Checkpoint(100, 100, "m100")


def test_delivered_offsets_survive_the_state_file(tmp_path: Path) -> None:
    store = store_with(A)
    expect(store, A, [], 100)
    store.settle(["s"])
    expect(store, A, [], 180)
    state = StateFile(tmp_path)
    state.save(store.snapshot())
    loaded, _ = state.load()
    assert loaded[A].committed == 180 and loaded[A].delivered == (100, 100, "m100")


def test_a_read_mark_is_saved_and_makes_the_file_recognizable(tmp_path: Path) -> None:
    """Issue 13: the mark set before a file's documents go out is in the state file, so a copy
    of it made while the agent is down (after a kill -9) is recognized at the next start; a
    mark short of MIN_COPY_OFFSET does not count."""
    store = store_with(A, B)
    mark = Checkpoint.at(MIN_COPY_OFFSET + 500, "mA")
    store.mark_read(A, mark)
    store.mark_read(B, Checkpoint.at(MIN_COPY_OFFSET - 1, "mB"))
    store.detach(A, Checkpoint.at(40, "m40"))  # a reader that stopped earlier keeps the mark
    state = StateFile(tmp_path)
    state.save(store.snapshot())
    loaded, _ = state.load()
    assert loaded[A].read == mark and loaded[A].recognizable
    assert loaded[B].read == FILE_START and not loaded[B].recognizable
    # A tailer that resumes the file keeps the mark in the next saves.
    again = OffsetStore(loaded)
    again.attach(A, "/log/2", FILE_START)
    progress = again.get(A)
    assert progress is not None and progress.read == mark and progress.recognizable
    state.save(again.snapshot())
    assert state.load()[0][A].read == mark


def test_a_state_file_without_read_marks_still_loads(tmp_path: Path) -> None:
    (tmp_path / "offsets.json").write_text(json.dumps({"version": 1, "files": {str(A): {
        "path": "/log/2", "offset": 5000, "updated": 1.0, "marker_offset": 5000, "marker": "m",
        "delivered": None}, str(B): {"path": "/log/3", "offset": 10, "updated": 1.0,
                                     "marker_offset": 10, "marker": "m", "delivered": None}}}))
    loaded, status = StateFile(tmp_path).load()
    assert status == "ok" and loaded[A].read == FILE_START
    assert loaded[A].recognizable and not loaded[B].recognizable  # A's checkpoint is far enough


async def test_one_save_serves_every_waiter_and_a_cancelled_waiter_cancels_none() -> None:
    barrier = SaveBarrier()
    waiters = [asyncio.create_task(barrier.wait(lambda: False)) for _ in range(1000)]
    await asyncio.sleep(0)
    assert barrier.wanted.is_set() and barrier.waiting == 1000
    number = barrier.taking()
    waiters[0].cancel()
    await asyncio.sleep(0)
    barrier.saved(number)
    assert all(await asyncio.gather(*waiters[1:]))
    assert barrier.waiting == 0


async def test_a_waiter_waits_for_a_snapshot_taken_after_it_came() -> None:
    barrier = SaveBarrier()
    before = barrier.taking()  # a save already under way holds an older snapshot
    waiter = asyncio.create_task(barrier.wait(lambda: False))
    await asyncio.sleep(0)
    barrier.saved(before)
    await asyncio.sleep(0)
    assert not waiter.done()
    barrier.saved(barrier.taking())
    assert await waiter


async def test_failed_saves_hold_waiters_and_say_why_until_one_works_or_they_stop() -> None:
    barrier = SaveBarrier()
    stopping = False
    waiter = asyncio.create_task(barrier.wait(lambda: stopping))
    other = asyncio.create_task(barrier.wait(lambda: False))
    await asyncio.sleep(0)
    barrier.taking()
    barrier.failed("No space left on device")
    await asyncio.sleep(0)
    assert not waiter.done() and barrier.error == "No space left on device"
    stopping = True
    barrier.taking()
    barrier.failed("No space left on device")
    assert await waiter is False
    barrier.saved(barrier.taking())
    assert await other is True and barrier.error is None
