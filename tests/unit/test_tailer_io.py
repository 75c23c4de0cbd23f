"""The tailer's I/O shell against real files: the agent's own state is never followed, and a
descriptor is never closed under a read still running in a thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from agent.identity import read_fingerprint
from agent.offsets import FileProgress, OffsetStore
from agent.tailer import Found, Tailer, TailerSet, _find_unfinished
from agent.types import Checkpoint, FileId, Lines, SourceFile
from agent.watcher import scan
from tests.unit.copies import Scene, follow_original_then_copy, start_tailer
from tests.unit.sources import source


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


def test_scan_skips_files_reached_through_a_symlinked_folder(tmp_path: Path) -> None:
    """Issue 9 item 1: `ln -s /root logs/dir` with `logs/**/*.log` shipped root's logs."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.log").write_text("password\n")
    logs = tmp_path / "logs"
    (logs / "app").mkdir(parents=True)
    (logs / "app" / "app.log").write_text("line\n")
    (logs / "linked").symlink_to(secret)
    pattern = str(logs / "**" / "*.log")
    found, skipped = scan([source(paths=[pattern])])
    assert [f.path for f in found] == [str(logs / "app" / "app.log")]
    # `**` does not enter it at all: a link to `/` walked the whole file system at every scan.
    assert [(s.path, s.reason) for s in skipped] == [
        (str(logs / "linked"), "symlinked folder under ** (follow_symlinks is false)")]
    found, skipped = scan([source(paths=[str(logs / "*" / "*.log")])])
    assert [(s.path, s.reason) for s in skipped] == [
        (str(logs / "linked" / "private.log"),
         "in a folder reached through a symlink (follow_symlinks is false)")]
    found, skipped = scan([source(paths=[pattern], follow_symlinks=True)])
    assert sorted(f.path for f in found) == [str(logs / "app" / "app.log"),
                                             str(logs / "linked" / "private.log")]
    # A symlink in the folder the glob names is the user's own choice.
    (tmp_path / "logs-link").symlink_to(logs)
    found, _ = scan([source(paths=[str(tmp_path / "logs-link" / "app" / "*.log")])])
    assert [f.path for f in found] == [str(tmp_path / "logs-link" / "app" / "app.log")]


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

    def slow_read(self: Tailer, *limit: int) -> bytes | None:
        entered.set()
        gate.wait(30)
        try:
            os.fstat(self.fd)
            seen.append("descriptor open")
            return read_chunk(self, *limit)
        except OSError as exc:
            seen.append(exc.errno)
            raise
        finally:
            finished.set()

    monkeypatch.setattr(Tailer, "_read_chunk", slow_read)

    async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        pass

    offsets = OffsetStore()
    tailers = TailerSet(start_tailer, [source(paths=[str(log)])], {"s": sink}, offsets,
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
    assert not tailers.live and not tailers.running


def test_unfinished_files_are_found_by_inode_and_fingerprint_in_their_last_folder(
        tmp_path: Path) -> None:
    rotated = tmp_path / "app.log.1"
    rotated.write_bytes(b"first line\nsecond line\n")
    reused = tmp_path / "other.log.1"
    reused.write_bytes(b"another file on a reused inode\n")
    entries = []
    for path, committed in ((rotated, 11), (reused, 5)):
        st = path.stat()
        fd = os.open(path, os.O_RDONLY)
        head = read_fingerprint(fd)
        os.close(fd)
        assert head is not None
        # The state knew `reused`'s inode with another first line.
        fingerprint = head if path == rotated else "0" * 16
        entries.append((SourceFile("s", FileId(st.st_dev, st.st_ino, fingerprint)),
                        FileProgress(str(tmp_path / "app.log"), Checkpoint.at(committed, None),
                                     0.0)))
    st = rotated.stat()
    assert _find_unfinished(entries, set()) == [
        Found("s", str(rotated), st.st_dev, st.st_ino, st.st_size)]
    # Already followed (found in the globs), or read to its end: nothing to recover.
    assert _find_unfinished(entries, {("s", st.st_dev, st.st_ino)}) == []
    done = [(f, FileProgress(p.path, Checkpoint.at(st.st_size, None), 0.0)) for f, p in entries]
    assert _find_unfinished(done, set()) == []


async def test_a_file_gone_between_scan_and_open_is_not_skipped_with_a_warning(
        tmp_path: Path) -> None:
    """Every rotation races the scan: a file deleted or renamed before its tailer opened it was
    logged as `file_skipped` ("unreadable: No such file or directory"), a warning telling the
    operator to fix the globs."""
    log = tmp_path / "app.log"
    log.write_bytes(b"one\n")
    st = log.stat()
    log.unlink()

    async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        pass

    tailers = TailerSet(start_tailer, [source(paths=[str(log)])], {"s": sink},
                        OffsetStore(), {"s": "beginning"})
    tailers.reconcile([Found("s", str(log), st.st_dev, st.st_ino, st.st_size)], ["s"])
    await asyncio.gather(*tailers.running.values())
    assert not tailers.skipped and not tailers.live


async def test_a_copy_found_while_cp_still_writes_it_is_not_read_again(tmp_path: Path) -> None:
    """logrotate's copy of a big file is found by a scan while `cp` still writes it: shorter
    than every point it could be checked at, it was read as a new file, and everything the
    original had shipped was shipped again (2,173 lines in the review's run)."""
    content = b"".join(b"line %07d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" % n for n in range(50_000))
    (tmp_path / "app.log").write_bytes(content)

    def cp() -> None:
        with (tmp_path / "app.log.1").open("wb") as out:
            for at in range(0, len(content), 100_000):
                out.write(content[at:at + 100_000])
                out.flush()
                time.sleep(0.05)  # a disk slower than the agent: the copy grows in steps

    scene = await follow_original_then_copy(tmp_path, threading.Thread(target=cp))
    assert not scene.copy_read_again(), scene.got


async def test_a_file_that_only_starts_like_a_known_one_is_read_as_new(tmp_path: Path) -> None:
    """The wait for a copy to grow is bounded: a file that shares the first line (a banner) and
    stays shorter than what was read of the other is a new file, read in full."""
    banner = b"=== service started ===\n"
    body = b"".join(b"line %07d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" % n for n in range(5_000))
    (tmp_path / "app.log").write_bytes(banner + body)
    other = banner + b"another run\n" * 100
    scene = await follow_original_then_copy(tmp_path, None, other)
    copy, log = scene.got[str(scene.copy)], scene.got[str(scene.log)]
    assert len(copy) == 1 and not copy & log, scene.got


async def test_a_new_log_that_starts_with_a_known_banner_is_not_held_back(tmp_path: Path) -> None:
    """A new log whose first line is a banner a big followed log also starts with is shorter
    than every point it could be checked at for a long while; it must be read as soon as its
    bytes differ, not once it stops growing (or outgrows the other). Here the big one is
    app.log, the new one app.log.1 (a second service, say)."""
    banner = b"=== service started ===\n"
    scene = Scene(tmp_path)
    scene.log.write_bytes(banner + b"".join(b"old line %07d xxxxxxxxxxxxxxxx\n" % n
                                            for n in range(20_000)))
    scene.scan(scene.log)
    await scene.read_log(20_001)
    scene.copy.write_bytes(banner + b"new line 0\n")
    scene.scan(scene.log, scene.copy)
    # The writer goes on for 9 s: a tailer that waits
    # for the file to stop growing has read nothing of it when the writer stops.
    read_while_writing: set[FileId] = set()
    for n in range(1, 90):
        with scene.copy.open("ab") as f:
            f.write(b"new line %d\n" % n)
        scene.tailers.hint(str(scene.copy))
        await asyncio.sleep(0.1)
        read_while_writing = set(scene.got.get(str(scene.copy), ()))
    await scene.tailers.stop()
    assert read_while_writing and not read_while_writing & scene.got[str(scene.log)], scene.got
