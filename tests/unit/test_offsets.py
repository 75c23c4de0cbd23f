"""The contiguous-ack rule and the atomic, versioned state file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.offsets import OffsetStore, StateFile
from agent.types import Ack, FileId

A = FileId(1, 2, "aaaa")
B = FileId(1, 3, "bbbb")


def store_with(*files: FileId) -> OffsetStore:
    store = OffsetStore()
    for fid in files:
        store.attach(fid, f"/log/{fid.ino}", 0)
    return store


def committed(store: OffsetStore, fid: FileId) -> int | None:
    return store.resume_offset(fid)


def test_offset_moves_only_past_the_contiguous_acknowledged_run() -> None:
    store = store_with(A)
    store.expect(A, [10, 20, 30], read_to=30)
    store.acknowledge([Ack(A, 20), Ack(A, 30)])
    assert committed(store, A) == 0
    store.acknowledge([Ack(A, 10)])
    assert committed(store, A) == 30
    assert store.outstanding() == 0


def test_lines_without_documents_count_as_acknowledged() -> None:
    store = store_with(A)
    store.expect(A, [], read_to=50)
    assert committed(store, A) == 50
    store.expect(A, [60], read_to=90)
    assert committed(store, A) == 50
    store.acknowledge([Ack(A, 60)])
    assert committed(store, A) == 90


def test_files_are_independent() -> None:
    store = store_with(A, B)
    store.expect(A, [5], read_to=5)
    store.expect(B, [7], read_to=7)
    store.acknowledge([Ack(B, 7)])
    assert (committed(store, A), committed(store, B)) == (0, 7)


def test_acks_for_unknown_files_are_ignored() -> None:
    store = store_with(A)
    store.acknowledge([Ack(B, 10)])
    assert committed(store, B) is None


def test_prune_forgets_only_released_old_files() -> None:
    store = store_with(A, B)
    store.detach(A)
    store.files[A].updated = 0
    store.files[B].updated = 0
    assert store.prune(older_than=100) == [A]
    assert list(store.files) == [B]


def test_state_file_round_trip(tmp_path: Path) -> None:
    store = store_with(A)
    store.expect(A, [], read_to=123)
    state = StateFile(tmp_path)
    assert store.dirty
    state.save(store.snapshot())
    assert not store.dirty
    loaded = state.load()
    assert loaded[A].committed == 123 and loaded[A].path == "/log/2"
    assert not (tmp_path / "offsets.json.tmp").exists()


def test_a_complete_temp_file_wins_over_the_older_state(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    store = store_with(A)
    state.save(store.snapshot())
    store.expect(A, [], read_to=99)
    (tmp_path / "offsets.json.tmp").write_text(json.dumps(store.snapshot()))
    assert state.load()[A].committed == 99
    assert not (tmp_path / "offsets.json.tmp").exists()


def test_a_torn_temp_file_is_ignored(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    store = store_with(A)
    store.expect(A, [], read_to=7)
    state.save(store.snapshot())
    (tmp_path / "offsets.json.tmp").write_text('{"version": 1, "fi')
    assert state.load()[A].committed == 7


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", b'{"version": 99, "files": {}}',
                                     b'{"version": 1, "files": {"x": {}}}', b"[1,2]"])
def test_corrupt_state_is_moved_aside_and_reported(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "offsets.json").write_bytes(content)
    with capture_logs() as logs:
        assert StateFile(tmp_path).load() == {}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["state_file_unreadable",
                                                                      "state_file_corrupt"]
    aside = [p for p in os.listdir(tmp_path) if p.startswith("offsets.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == content
    assert not (tmp_path / "offsets.json").exists()
