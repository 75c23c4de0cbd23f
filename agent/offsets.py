"""Committed read offsets: the contiguous-acknowledgement rule, and the atomic state file.

`OffsetStore` is pure bookkeeping. For each file it remembers, in file
order, the end offsets of the documents handed to the shipper, and moves
the committed offset only to the end of the longest run, from the start,
whose documents are all acknowledged (the rule Vector's OrderedFinalizer
gives). Lines that produce no document (filtered, empty) count as
acknowledged as soon as they are read.

`StateFile` persists the committed offsets: temp file, fsync, rename, fsync
of the folder. A state file that cannot be read is moved aside and
reported; the agent then starts where `on_corrupt_state` says: from the
beginning of each file by default, which re-sends documents CouchDB already
has and answers with `conflict`.

`SaveBarrier` makes a tailer wait, once per file, until the saved state holds a mark a copy
of the file can be recognized by, before the file's documents go out: otherwise a kill -9
before the next save, then a copy-truncate, ships the copy again under new ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from agent import durable
from agent.identity import FINGERPRINT_BYTES, MARKER_BYTES
from agent.types import FILE_START, Ack, Checkpoint, Document, SourceFile

STATE_VERSION = 1
MIN_COPY_OFFSET = FINGERPRINT_BYTES + MARKER_BYTES
"""The least offset of a marker a copy is recognized by: past the fingerprinted first line, so
that files that merely start with the same banner are never taken for copies."""
StateStatus = Literal["ok", "absent", "corrupt"]
log = structlog.get_logger("agent.offsets")


@dataclass(slots=True)
class FileProgress:
    """One file's committed checkpoint and its documents still waiting for an ack."""

    path: str
    checkpoint: Checkpoint
    """Committed: every line before `checkpoint.offset` is acknowledged."""
    updated: float
    delivered: Checkpoint | None = None
    """The checkpoint when all the file's documents up to there were in CouchDB, not only in
    the spool: where to read again from if the spool is lost."""
    pending: deque[int] | tuple[()] = ()
    """Ends of the documents queued, in file order, not yet committed. The three are the shared
    empty `()` or `frozenset()` while there is nothing: a thousand files each with their own
    empty deques and set cost megabytes, and a deque keeps up to 16 freed blocks (8 KiB) after
    a catch-up, so a drained one is dropped."""
    acked: set[int] | frozenset[int] = frozenset()
    marks: deque[Checkpoint] | tuple[()] = ()
    """Read positions reported with their markers, not yet all acknowledged."""
    live: bool = False
    read: Checkpoint = FILE_START
    """A point the file held when it was read (where the last reader stopped, or the mark set
    before its documents first went out), and the marker there; saved: lets a copy of the file
    made before it was truncated be recognized even when acks lag behind reading, also after
    a kill -9."""
    recognizable: bool = False
    """Whether the saved state holds a mark of this file at MIN_COPY_OFFSET or past it (the
    checkpoint or `read`): a copy of the file is then recognized at the next start."""

    @property
    def committed(self) -> int:
        return self.checkpoint.offset


class OffsetStore:
    """Committed offsets per `SourceFile`, and the rule that moves them."""

    def __init__(self, entries: dict[SourceFile, FileProgress] | None = None) -> None:
        self.files: dict[SourceFile, FileProgress] = entries or {}
        self.dirty = False

    def get(self, file: SourceFile) -> FileProgress | None:
        return self.files.get(file)

    def latest(self, file: SourceFile) -> SourceFile | None:
        """The newest generation known of the same file (same inode and first line)."""
        known = [f for f in self.files
                 if f.source == file.source and f.file_id.same_file(file.file_id)]
        return max(known, key=lambda f: f.file_id.generation) if known else None

    def copies_of(self, file: SourceFile) -> list[SourceFile]:
        """Known files with the same first line on the same device but another inode: what a
        copy of a file (copy-truncate, or a move across folders) would be a copy of."""
        fid = file.file_id
        return [f for f in self.files
                if f.source == file.source and f.file_id.dev == fid.dev
                and f.file_id.fingerprint == fid.fingerprint and f.file_id.ino != fid.ino]

    def attach(self, file: SourceFile, path: str, start: Checkpoint) -> None:
        """A tailer starts reading `file` at `start`, whose marker it has checked.

        Older generations of the same file are kept until `prune`: a copy of the file made
        before it was rewritten (copy-truncate) continues one of them, and may claim it only
        after the original was read again under the new generation."""
        progress = self.files.get(file)
        if progress is None or progress.committed != start.offset or progress.path != path:
            self.dirty = True
        new = FileProgress(path, start, time.time(), live=True,
                           delivered=progress.delivered if progress is not None else None)
        if new.delivered is not None and new.delivered.offset > start.offset:
            new.delivered = None
        if progress is not None:
            # Acks still in flight from an earlier reader of these bytes (a copy's original)
            # count: the same offset in the same file id is the same document.
            new.acked = progress.acked
            # The saved mark stays in the state file: what it shipped may still be copied.
            new.read, new.recognizable = progress.read, progress.recognizable
        self.files[file] = new

    def detach(self, file: SourceFile, read: Checkpoint) -> None:
        """The tailer let go of the file, having read up to `read`; the entry stays until
        `prune`."""
        progress = self.files.get(file)
        if progress is not None:
            progress.live = False
            progress.updated = time.time()
            if read.marker is not None and read.marker_offset >= progress.read.marker_offset:
                progress.read = read

    def mark_read(self, file: SourceFile, point: Checkpoint) -> None:
        """The file held `point` (its marker checked) before its documents go out: the next
        save keeps it as the mark a copy of the file is recognized by."""
        progress = self.files.get(file)
        if progress is not None and point.marker_offset >= progress.read.marker_offset:
            progress.read = point
            self.dirty = True

    def covered(self, file: SourceFile) -> None:
        """A save that holds the file's mark (`mark_read`) succeeded."""
        progress = self.files.get(file)
        if progress is not None and (_usable(progress.read) or _usable(progress.checkpoint)):
            progress.recognizable = True

    def expect(self, file: SourceFile, doc_ends: Sequence[int], read_to: int,
               read_to_marker: str) -> None:
        """Documents ending at `doc_ends` were queued; every line up to `read_to` was read,
        and the bytes before it hash to `read_to_marker`."""
        progress = self.files[file]
        pending = progress.pending
        last = doc_ends[-1] if doc_ends else pending[-1] if pending else progress.committed
        if doc_ends or read_to > last:
            if not isinstance(pending, deque):
                pending = progress.pending = deque()
            pending.extend(doc_ends)
            if read_to > last:
                pending.append(read_to)
                _acked(progress).add(read_to)
        mark = Checkpoint.at(read_to, read_to_marker)
        if isinstance(progress.marks, deque):
            progress.marks.append(mark)
        else:
            progress.marks = deque((mark,))
        self._advance(progress)

    def acknowledge(self, acks: Iterable[Ack | Document]) -> None:
        touched: list[FileProgress] = []
        last_file: SourceFile | None = None
        acked: set[int] | None = None
        for ack in acks:
            # Acks come in runs from one file: look a file up once per run, not per document.
            if ack.file is not last_file:
                last_file = ack.file
                progress = self.files.get(ack.file)
                acked = None if progress is None else _acked(progress)
                if progress is not None and (not touched or touched[-1] is not progress):
                    touched.append(progress)
            if acked is not None:
                acked.add(ack.end)
        for each in {id(p): p for p in touched}.values():
            self._advance(each)

    def settle(self, sources: Iterable[str]) -> None:
        """The spool of these sources' database is empty: everything committed is in CouchDB."""
        names = set(sources)
        for file, p in self.files.items():
            if file.source in names and p.delivered != p.checkpoint:
                p.delivered = p.checkpoint
                self.dirty = True

    def rewind(self, sources: Iterable[str]) -> list[SourceFile]:
        """The spool of these sources' database lost documents: read every file again from
        where CouchDB had all of it. Returns the files moved back."""
        names = set(sources)
        moved = []
        for file, p in self.files.items():
            if file.source in names and p.delivered is not None and p.delivered.offset < p.committed:
                p.checkpoint = p.delivered
                moved.append(file)
            elif file.source in names and p.delivered is None and p.committed > 0:
                p.checkpoint = FILE_START
                moved.append(file)
            else:
                continue
            p.recognizable = _usable(p.read) or _usable(p.checkpoint)
        if moved:
            self.dirty = True
        return moved

    def outstanding(self) -> int:
        """Documents queued but not yet acknowledged, over all files."""
        return sum(sum(1 for end in p.pending if end not in p.acked) for p in self.files.values())

    def prune(self, older_than: float) -> list[SourceFile]:
        """Forget files no tailer follows that were let go of before `older_than`."""
        gone = [f for f, p in self.files.items() if not p.live and p.updated < older_than]
        for f in gone:
            del self.files[f]
        if gone:
            self.dirty = True
        return gone

    def _advance(self, progress: FileProgress) -> None:
        pending, acked = progress.pending, progress.acked
        if not isinstance(pending, deque) or not isinstance(acked, set):
            return  # nothing queued, or nothing acknowledged
        committed = None
        while pending and pending[0] in acked:
            committed = pending.popleft()
            acked.discard(committed)
        if committed is not None:
            if not pending:
                progress.pending = ()
            if not acked:
                # A set never shrinks: one that held a whole batch's acks would keep that
                # table for good, per file (a thousand files: tens of MiB).
                progress.acked = frozenset()
            marks, marked = progress.marks, progress.checkpoint
            if isinstance(marks, deque):
                while marks and marks[0].offset <= committed:
                    marked = marks.popleft()
                if not marks:
                    progress.marks = ()
            progress.checkpoint = Checkpoint(committed, marked.marker_offset, marked.marker)
            progress.updated = time.time()
            self.dirty = True

    def snapshot(self) -> dict[str, Any]:
        """The persistent form, and a clean slate for `dirty`."""
        self.dirty = False
        return {
            "version": STATE_VERSION,
            "files": {
                str(f): {"path": p.path, "offset": p.committed, "updated": round(p.updated, 3),
                         "marker_offset": p.checkpoint.marker_offset, "marker": p.checkpoint.marker,
                         "delivered": None if p.delivered is None else list(p.delivered),
                         **({"read": list(p.read)} if _usable(p.read) else {})}
                for f, p in self.files.items()
            },
        }


class SaveBarrier:
    """Lets tailers wait until the offsets are saved; one save serves every waiter.

    A tailer sets its file's mark (`OffsetStore.mark_read`) and waits (`wait`) for a save
    of a snapshot taken after that: only then may the file's documents go out. The waiters
    ask for a save at once (`wanted`: the agent saves then, not at its next tick); while
    saves fail, they wait for the tick's retries, and the status says why (`error`)."""

    def __init__(self) -> None:
        self.wanted = asyncio.Event()
        """Set while a tailer waits for a save not yet started."""
        self.waiting = 0
        """Tailers waiting now."""
        self.error: str | None = None
        """Why the last save failed; None once one succeeds."""
        self.failing_since: float | None = None
        self._taken = 0
        self._saved = 0
        self._outcome: asyncio.Future[None] | None = None

    def taking(self) -> int:
        """A snapshot is taken to be saved: its number (what a waiter waits for)."""
        self._taken += 1
        return self._taken

    def saved(self, number: int) -> None:
        self._saved = max(self._saved, number)
        self.error = self.failing_since = None
        self._tell()

    def failed(self, error: str) -> None:
        self.error = error
        if self.failing_since is None:
            self.failing_since = time.time()
        self._tell()

    async def wait(self, stopping: Callable[[], bool]) -> bool:
        """Until a snapshot taken after this call is saved (True), or, after a save attempt,
        `stopping()` says to give up (False). Cancelling it cancels no other waiter."""
        wanted = self._taken + 1
        self.waiting += 1
        self.wanted.set()
        try:
            while self._saved < wanted:
                if stopping():
                    return False
                if self._outcome is None:
                    self._outcome = asyncio.get_running_loop().create_future()
                # Not `await future`: a waiter cancelled (the agent stops) would cancel it
                # for every other waiter.
                await asyncio.wait({self._outcome})
            return True
        finally:
            self.waiting -= 1

    def _tell(self) -> None:
        """A save succeeded or failed: every waiter looks again."""
        outcome, self._outcome = self._outcome, None
        if outcome is not None and not outcome.done():
            outcome.set_result(None)


class StateFile:
    """The offsets on disk, replaced atomically on every write; and the lock that makes
    state_dir one agent's."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "offsets.json"
        self._tmp = durable.tmp_path(self.path)
        self.lock_path = state_dir / "lock"
        self._lock_fd: int | None = None

    def load(self) -> tuple[dict[SourceFile, FileProgress], StateStatus]:
        """Lock state_dir, then read the committed offsets; a damaged file is moved aside and
        reported, never fatal. OSError if another agent holds state_dir.

        The status tells a first start ("absent") and a lost state ("corrupt") from "ok".
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        tmp_entries = self._read(self._tmp, quiet=True)
        if tmp_entries is not None:
            # A complete temp file means a write was fsynced but not yet renamed: it is newer.
            os.replace(self._tmp, self.path)
            return tmp_entries, "ok"
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
        if not self.path.exists():
            return {}, "absent"
        entries = self._read(self.path, quiet=False)
        if entries is None:
            aside = self.path.with_name(f"offsets.json.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("state_file_corrupt", path=str(self.path), moved_to=str(aside),
                      action="starting without saved offsets (on_corrupt_state says where)")
            return {}, "corrupt"
        return entries, "ok"

    def _lock(self) -> None:
        """Hold an exclusive lock on state_dir until this process ends (the kernel drops it).

        Two agents on one state_dir (the service, and an `agent run` started by hand with the
        same config) would write the same temp files, so a torn offsets.json could be renamed
        into place, and cut or delete each other's spool segments: lines lost. The second one
        is refused at start instead. A POSIX lock (lockf), as it belongs to the process: an
        agent started again in the same process (tests do) takes it again."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OSError(errno.EBUSY, f"state_dir {self.path.parent} is in use by another agent "
                          f"(pid {holder}); stop it, or give this one its own state_dir") from None
        except OSError:
            os.close(fd)
            raise
        # The holder's pid, for the message above: a help only, the lock is what counts.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def save(self, snapshot: dict[str, Any]) -> None:
        """Write `snapshot` durably (all bytes, fsync, rename, fsync of the folder), or raise
        OSError and leave the last saved state as it was. Blocking.

        Takes state_dir's lock first if `load` did not: an agent refused at start must not
        write its empty offsets over those of the agent that holds state_dir."""
        self._lock()
        durable.replace_file(self.path, orjson.dumps(snapshot))

    def _read(self, path: Path, quiet: bool) -> dict[SourceFile, FileProgress] | None:
        try:
            raw = orjson.loads(durable.read_regular_file(path, None))
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {raw.get('version')!r}")
            return {SourceFile.parse(key): _progress(e) for key, e in raw["files"].items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not quiet:
                log.error("state_file_unreadable", path=str(path), error=str(exc))
            return None


def _acked(progress: FileProgress) -> set[int]:
    """The file's set of acknowledged ends, made when the first ack comes."""
    if not isinstance(progress.acked, set):
        progress.acked = set()
    return progress.acked


def _progress(entry: dict[str, Any]) -> FileProgress:
    checkpoint = Checkpoint(int(entry["offset"]), int(entry["marker_offset"]),
                            entry["marker"]).check()
    progress = FileProgress(str(entry["path"]), checkpoint, float(entry["updated"]))
    delivered = entry["delivered"]
    if delivered is not None:
        offset, marker_offset, marker = delivered
        progress.delivered = Checkpoint(int(offset), int(marker_offset), marker).check()
        if progress.delivered.offset > checkpoint.offset:
            raise ValueError(f"invalid delivered offsets {delivered!r}")
    read = entry.get("read")  # absent in state files written before it was saved
    if read is not None:
        offset, marker_offset, marker = read
        progress.read = Checkpoint(int(offset), int(marker_offset), marker).check()
    progress.recognizable = _usable(progress.read) or _usable(checkpoint)
    return progress


def _usable(point: Checkpoint) -> bool:
    """Whether a copy of the file can be recognized by this point's marker."""
    return point.marker is not None and point.marker_offset >= MIN_COPY_OFFSET
