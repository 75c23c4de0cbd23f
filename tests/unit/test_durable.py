"""Durable writes: every byte written (short writes looped), fsync, rename, fsync of the folder;
for the offsets, the dead letters and the spool. Short writes are made two ways: by a real, tiny,
nearly full tmpfs (as root), and by an `os.write` that takes only a few bytes per call."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import orjson
import pytest

from agent import durable
from agent.deadletter import DeadLetterFile, Rejection
from agent.offsets import OffsetStore, StateFile
from agent.spool import Spool
from agent.types import FILE_START, Document, FileId, SourceFile
from tests.tmpfs import fill, tmpfs

F = SourceFile("s", FileId(1, 2, "aaaa"))


def offsets(files: int) -> OffsetStore:
    """A store with `files` files (about 130 bytes of state each)."""
    store = OffsetStore()
    for n in range(files):
        f = SourceFile("s", FileId(1, n + 10, f"{n:08x}"))
        store.attach(f, f"/var/log/app/file-{n:06d}.log", FILE_START)
        store.expect(f, [], 100 + n, f"m{n}")
    return store


@pytest.fixture
def short_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`os.write` takes at most 7 bytes per call, without raising, as a nearly full disk may."""
    real = os.write
    calls: list[int] = []

    def write(fd: int, data: bytes) -> int:
        calls.append(fd)
        return real(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", write)
    return calls


def test_state_file_save_writes_every_byte_of_a_short_write(tmp_path: Path,
                                                            short_writes: list[int]) -> None:
    store = offsets(20)
    StateFile(tmp_path).save(store.snapshot())
    loaded, status = StateFile(tmp_path).load()
    assert status == "ok" and len(loaded) == 20
    assert len(short_writes) > 100, "the short writer was in the path"


def test_dead_letters_are_complete_after_short_writes(tmp_path: Path,
                                                      short_writes: list[int]) -> None:
    doc = Document("d1", b'{"_id":"d1","msg":"' + b"x" * 200 + b'"}', F, 10)
    DeadLetterFile(tmp_path).append("log_app", [Rejection(doc, "forbidden", "no")] * 3)
    lines = (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["doc"]["msg"] for line in lines] == ["x" * 200] * 3
    assert oct((tmp_path / "dead-letter.jsonl").stat().st_mode & 0o777) == "0o600"


def test_spool_records_are_complete_after_short_writes(tmp_path: Path,
                                                       short_writes: list[int]) -> None:
    docs = [Document(f"d{n}", b'{"_id":"d%d","x":"%s"}' % (n, b"y" * 50), F, n) for n in range(5)]
    spool = Spool(tmp_path, 1 << 20, 1 << 16)
    spool.open()
    assert spool.append(docs)
    spool.close()
    reopened = Spool(tmp_path, 1 << 20, 1 << 16)
    reopened.open()
    assert [d.doc for d in reopened.read(100, 1 << 20)] == docs and not reopened.damaged


def test_write_all_raises_when_the_kernel_takes_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as raised:
        durable.replace_file(target, b"new content")
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and not durable.tmp_path(target).exists()


def test_replace_file_sets_the_mode_even_over_an_old_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    durable.tmp_path(target).write_bytes(b"left by a crash")
    durable.tmp_path(target).chmod(0o666)
    durable.replace_file(target, b"{}", mode=0o640, sync=False)
    assert target.read_bytes() == b"{}" and oct(target.stat().st_mode & 0o777) == "0o640"


def test_a_nearly_full_tmpfs_never_gets_a_truncated_state_file() -> None:
    """The issue's case: os.write wrote 8,192 of 30,029 bytes without raising, and the
    truncated offsets.json was renamed into place; the next start saw a corrupt state."""
    with tmpfs("64k") as folder:
        state = StateFile(folder)
        state.save(offsets(2).snapshot())
        fill(folder, leave=8192)
        big = offsets(250).snapshot()
        assert len(orjson.dumps(big)) > 3 * 8192
        with pytest.raises(OSError) as raised:
            state.save(big)
        assert raised.value.errno == errno.ENOSPC
        assert not (folder / "offsets.json.tmp").exists(), "the partial temp file is removed"
        loaded, status = state.load()
        assert status == "ok" and len(loaded) == 2, "the last complete state is kept"
        (folder / "filler").unlink()
        state.save(big)
        assert len(state.load()[0]) == 250


def test_a_full_tmpfs_leaves_no_partial_dead_letter_or_spool_record() -> None:
    with tmpfs("64k") as folder:
        docs = [Document(f"d{n}", b'{"_id":"d%d","x":"%s"}' % (n, b"y" * 400), F, n)
                for n in range(40)]
        spool = Spool(folder / "spool", 1 << 20, 1 << 20)
        spool.open()
        assert spool.append(docs[:1])
        fill(folder, leave=8192)
        with pytest.raises(OSError):
            spool.append(docs)
        dead = DeadLetterFile(folder)
        with pytest.raises(OSError):
            dead.append("log_app", [Rejection(d, "forbidden", "no") for d in docs])
        assert dead.path.read_bytes() == b"", "no torn line for the next append to follow"
        spool.close()
        (folder / "filler").unlink()
        reopened = Spool(folder / "spool", 1 << 20, 1 << 20)
        reopened.open()
        assert [d.doc for d in reopened.read(100, 1 << 20)] == docs[:1] and not reopened.damaged
