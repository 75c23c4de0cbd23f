"""Following files: one `Tailer` per open file, and the `TailerSet` that keeps them by identity.

A tailer owns one file descriptor. Woken by an inotify hint, a poll or a
rescan, it checks the file (fstat, and the marker of the bytes before its
read position), reads whatever was appended in chunks off the event loop,
frames complete lines (and multi-line events) and hands them on in file
order. It reads from the file it opened, not from the name, so a renamed
(rotated) file is read to its end; a file that leaves every glob, or is
deleted, is read to its end and then closed, so its disk space is freed.

Tailers are keyed by (source, device, inode), never by path: a known file
seen under a new name is the same file renamed. When a tailer learns its
file's identity it claims offsets from the `OffsetStore` (`TailerSet.claim`):

- the same file (inode and first line) was read before: resume at its
  committed offset, if the file is still that long and the bytes before the
  offset are unchanged; otherwise it was rewritten in place, and is read from
  the start under a new generation, so no document id is reused;
- a file with another inode but the same first line and the same bytes
  before a known offset (one past the first line) is a copy (copy-truncate,
  a move across file systems): it continues the original's offsets and ids
  once the original is let go, so nothing already read is sent again;
- otherwise it is a new file: read from its start, or from its end for files
  found at the first start when the source says `start_at: end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config import SourceConfig, StartAt
from agent.identity import (
    FINGERPRINT_BYTES,
    MARKER_BYTES,
    fingerprint,
    last_line_end,
    marker,
    read_fingerprint,
    read_marker,
)
from agent.lines import splitter_for
from agent.multiline import MultilineAssembler
from agent.offsets import FileProgress, OffsetStore
from agent.types import FileId, Lines, LineSink, SourceFile

READ_CHUNK = 256 * 1024
MIN_COPY_OFFSET = FINGERPRINT_BYTES + MARKER_BYTES
log = structlog.get_logger("agent.tailer")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@dataclass(frozen=True, slots=True)
class Found:
    """A file a source's globs matched in a scan, with its size then."""

    source: str
    path: str
    dev: int
    ino: int
    size: int


class Tailer:
    def __init__(self, source: SourceConfig, path: str, fd: int, at_first_start: bool,
                 owner: TailerSet) -> None:
        self.source = source
        self.path = path
        self.fd = fd
        self.at_first_start = at_first_start
        self.owner = owner
        self.file: SourceFile | None = None
        self.splitter = splitter_for(source.encoding, source.max_line_bytes)
        self.multiline = self._assembler()
        self.unlinked = asyncio.Event()
        """Set when the file is no longer at any path the source's globs match."""
        self.released = asyncio.Event()
        """Set when this tailer stops owning its file's offsets (truncated, or done)."""
        self.seen_size = -1
        self._recent = b""
        """The last MARKER_BYTES read, ending at `splitter.position`."""
        self._wake = asyncio.Event()
        self._wake.set()
        self.log = log.bind(source=source.name, path=path)

    def _assembler(self) -> MultilineAssembler | None:
        ml = self.source.multiline
        return None if ml is None else MultilineAssembler(ml.start, ml.max_bytes, self.source.encoding)

    def wake(self) -> None:
        self._wake.set()

    def unlink(self) -> None:
        if not self.unlinked.is_set():
            self.unlinked.set()
            self.log.info("file_unlinked", action="reading it to its end, then releasing it")
        self._wake.set()

    def rename(self, path: str) -> None:
        self.log.info("file_renamed", new_path=path)
        self.path = path
        self.log = self.log.bind(path=path)

    async def run(self) -> None:
        try:
            await self._follow()
        finally:
            os.close(self.fd)
            self._release()

    async def _follow(self) -> None:
        last_growth = time.monotonic()
        while True:
            woken = await self._wait()
            st = await asyncio.to_thread(os.fstat, self.fd)
            self.seen_size = st.st_size
            if self.file is not None and st.st_size < self.splitter.position:
                await self._truncated(st.st_size)
            if self.file is None and not await self._identify(st.st_size):
                if self.unlinked.is_set() and (st.st_nlink == 0 or self._idle(last_growth)):
                    return
                continue
            grew = await self._read_to_end()
            if grew is None:
                await self._truncated(st.st_size)
                self._wake.set()
                continue
            if grew:
                last_growth = time.monotonic()
            elif not woken and self.multiline is not None and self.multiline.pending:
                await self._flush_event()
            if self.unlinked.is_set() and (st.st_nlink == 0 or self._idle(last_growth)):
                await self._finish()
                return

    async def _wait(self) -> bool:
        """Wait to be woken; return False when a timeout (rotation, multiline) fired instead."""
        timeouts = []
        if self.unlinked.is_set():
            timeouts.append(self.source.rotate_wait)
        if self.multiline is not None and self.multiline.pending and self.source.multiline:
            timeouts.append(self.source.multiline.timeout)
        woken = True
        if timeouts:
            try:
                async with asyncio.timeout(min(timeouts)):
                    await self._wake.wait()
            except TimeoutError:
                woken = False
        else:
            await self._wake.wait()
        self._wake.clear()
        return woken

    def _idle(self, last_growth: float) -> bool:
        return time.monotonic() - last_growth >= self.source.rotate_wait

    async def _identify(self, size: int) -> bool:
        fingerprint = await asyncio.to_thread(read_fingerprint, self.fd)
        if fingerprint is None:
            return False
        st = os.fstat(self.fd)
        claim = await self.owner.claim(self, SourceFile(self.source.name,
                                                        FileId(st.st_dev, st.st_ino, fingerprint)), size)
        if claim is None:
            return False
        self.at_first_start = False
        self.file, offset = claim
        self.splitter = splitter_for(self.source.encoding, self.source.max_line_bytes, offset)
        self._recent = await asyncio.to_thread(os.pread, self.fd, min(offset, MARKER_BYTES),
                                               max(0, offset - MARKER_BYTES))
        self.log = self.log.bind(file_id=str(self.file.file_id))
        self.log.info("file_opened", offset=offset, size=size)
        return True

    async def marker_matches(self, offset: int, expected: str | None) -> bool:
        """Whether the bytes before `offset` in this file hash to `expected`."""
        if expected is None:
            return True
        return await asyncio.to_thread(read_marker, self.fd, offset) == expected

    async def _truncated(self, size: int) -> None:
        self.log.warning("file_truncated", offset=self.splitter.position, size=size,
                         action="reading it again from the start")
        await self._flush_event()
        self._release()
        self.released = asyncio.Event()
        self.file = None
        self.splitter = splitter_for(self.source.encoding, self.source.max_line_bytes)
        self.multiline = self._assembler()
        self._recent = b""

    async def _read_to_end(self) -> bool | None:
        """Read and hand on every complete line up to the end of the file. True if it grew,
        False if not, None if it was rewritten (truncated and written again) under us."""
        grew = False
        while True:
            # The budget shared by all tailers is held from the read until the chunk's
            # documents are queued: that is when a chunk takes memory. The chunk lives only in
            # the call, so a tailer waiting for the budget holds none.
            async with self.owner.read_budget:
                read = await self._read_and_hand_on()
            if not read:
                return None if read is None else grew
            grew = True

    async def _read_and_hand_on(self) -> bool | None:
        """Read one chunk and hand on its complete lines. True if there was one, False at the
        end of the file, None if it was rewritten."""
        data = await asyncio.to_thread(self._read_chunk)
        if data is None:
            return None
        if not data:
            return False
        lines = self.splitter.feed(data)
        before_end = b""
        if lines:
            upto = len(data) - (self.splitter.position - lines[-1].end)
            before_end = data[max(0, upto - MARKER_BYTES):upto]
            if len(before_end) < MARKER_BYTES:
                before_end = self._recent + before_end
        self._recent = (self._recent + data[-MARKER_BYTES:])[-MARKER_BYTES:]
        if lines:
            await self._hand_on(lines, marker(before_end))
        return True

    def _read_chunk(self) -> bytes | None:
        """The next chunk, or None if the file no longer holds what was read. One pread takes the
        bytes before the read position too, so the check and the read see the same file (the
        start of the file is checked against the fingerprint). Blocking."""
        assert self.file is not None
        position, recent = self.splitter.position, self._recent
        raw = os.pread(self.fd, READ_CHUNK + len(recent), position - len(recent))
        if raw[: len(recent)] != recent:
            return None
        data = raw[len(recent):]
        if position == 0 and data and fingerprint(data) != self.file.file_id.fingerprint:
            return None
        return data

    async def _hand_on(self, lines: Lines, end_marker: str) -> None:
        assert self.file is not None
        if self.multiline is not None:
            lines = self.multiline.feed(lines)
            if not lines:
                return
            end_marker = await asyncio.to_thread(read_marker, self.fd, lines[-1].end)
        await self._emit(lines, end_marker)

    async def _emit(self, lines: Lines, end_marker: str) -> None:
        assert self.file is not None
        await self.owner.sinks[self.source.name](self.file, self.path, lines, end_marker)

    async def _flush_event(self) -> None:
        """Hand on the multi-line event still being assembled (timeout, or the file ends)."""
        if self.multiline is not None and self.file is not None:
            event = self.multiline.flush()
            if event is not None:
                await self._emit(Lines.of([event]),
                                 await asyncio.to_thread(read_marker, self.fd, event.end))

    async def _finish(self) -> None:
        """The file is done: its unterminated last line, if any, is a line too."""
        line = self.splitter.flush() if self.file is not None else None
        if line is not None:
            await self._hand_on(Lines.of([line]),
                                await asyncio.to_thread(read_marker, self.fd, line.end))
        await self._flush_event()
        unread = self.seen_size - self.splitter.position
        self.log.info("file_released", offset=self.splitter.position, unread_bytes=max(unread, 0))

    def reference(self) -> tuple[int, str | None]:
        """How far this tailer has read, and the marker there."""
        return self.splitter.position, marker(self._recent) if self._recent else None

    def _release(self) -> None:
        if self.file is not None:
            self.owner.offsets.detach(self.file, *self.reference())
            self.owner.let_go(self, self.file)
        self.released.set()


class TailerSet:
    """The live tailers, keyed by (source, device, inode); reconciles them with each scan and
    decides where each file is read from (`claim`)."""

    def __init__(self, spawn: Spawn, sources: Iterable[SourceConfig], sinks: dict[str, LineSink],
                 offsets: OffsetStore, start_at: dict[str, StartAt],
                 read_budget: contextlib.AbstractAsyncContextManager[Any] | None = None) -> None:
        self.read_budget = read_budget or contextlib.nullcontext()
        """Held while a chunk is read and handed on (the Agent's, shared by all tailers)."""
        self.spawn = spawn
        self.sources = {s.name: s for s in sources}
        self.sinks = sinks
        self.offsets = offsets
        self.start_at = start_at
        """Where files found by the first scan and unknown to the offsets start, per source."""
        self.live: dict[tuple[str, int, int], Tailer] = {}
        self.owners: dict[SourceFile, Tailer] = {}
        """Which tailer reads each file now."""
        self.by_path: dict[str, set[Tailer]] = {}
        """The same file may be followed by several sources."""
        self.tasks: set[asyncio.Task[None]] = set()
        self._scans = 0

    def reconcile(self, found: Iterable[Found], scanned: Iterable[str]) -> None:
        """Start tailers for new files, follow renames, wake tailers whose file changed, and let
        go of files the scanned sources' globs no longer match."""
        self._scans += 1
        seen = set()
        for item in found:
            key = (item.source, item.dev, item.ino)
            seen.add(key)
            tailer = self.live.get(key)
            if tailer is None:
                self._open(item)
                continue
            if tailer.path != item.path:
                self._unindex(tailer)
                tailer.rename(item.path)
                self.by_path.setdefault(item.path, set()).add(tailer)
            if item.size != tailer.seen_size or tailer.file is None:
                tailer.wake()
        sources = set(scanned)
        for key, tailer in self.live.items():
            if key[0] in sources and key not in seen:
                tailer.unlink()

    def hint(self, path: str) -> None:
        for tailer in self.by_path.get(path, ()):
            tailer.wake()

    async def claim(self, tailer: Tailer, file: SourceFile, size: int) -> tuple[SourceFile, int] | None:
        """Decide which offsets `tailer` reads `file` with, and from where (module docstring).
        None if the tailer was unlinked while waiting for a copy's original."""
        store = self.offsets
        while True:
            known = store.latest(file)
            if known is not None:
                progress = store.get(known)
                assert progress is not None
                if progress.committed <= size and await tailer.marker_matches(
                        progress.marker_offset, progress.marker):
                    return self._attach(tailer, known, progress.committed, progress.marker)
                rewritten = known.file_id.next_generation()
                tailer.log.warning("file_rewritten", committed=progress.committed, size=size,
                                   generation=rewritten.generation,
                                   action="reading it from the start")
                return self._attach(tailer, SourceFile(file.source, rewritten), 0, None)
            waited = False
            for original in store.copies_of(file):
                progress = store.get(original)
                assert progress is not None
                owner = self.owners.get(original)
                if not await self._is_copy(tailer, progress, owner, size):
                    continue
                if owner is not None:
                    tailer.log.info("copy_detected", original=owner.path,
                                    action="waiting until the original is let go")
                    if not await _first_of(owner.released, tailer.unlinked):
                        return None
                    waited = True
                    break
                tailer.log.info("copy_adopted", original=progress.path, offset=progress.committed)
                return self._attach(tailer, original, progress.committed, progress.marker)
            if waited:
                continue
            offset = 0
            if tailer.at_first_start and self.start_at[file.source] == "end":
                newline = "\n".encode(tailer.source.encoding)
                offset = await asyncio.to_thread(last_line_end, tailer.fd, size, newline)
            return self._attach(tailer, file, offset, None)

    @staticmethod
    async def _is_copy(tailer: Tailer, original: FileProgress, owner: Tailer | None,
                       size: int) -> bool:
        """Whether the tailer's file holds the original's bytes before a known offset: the
        committed one, or where its reader is (or stopped). The offset must lie past the
        fingerprinted first line, so that files that merely start with the same banner are
        never taken for copies."""
        references = [(original.marker_offset, original.marker),
                      owner.reference() if owner is not None
                      else (original.read_offset, original.read_marker)]
        for offset, expected in references:
            if expected is not None and MIN_COPY_OFFSET <= offset <= size and \
                    await tailer.marker_matches(offset, expected):
                return True
        tailer.log.debug("not_a_copy", original=original.path, references=references, size=size,
                         owner_live=owner is not None)
        return False

    def _attach(self, tailer: Tailer, file: SourceFile, offset: int,
                marker_value: str | None) -> tuple[SourceFile, int]:
        self.offsets.attach(file, tailer.path, offset, marker_value)
        self.owners[file] = tailer
        return file, offset

    def let_go(self, tailer: Tailer, file: SourceFile) -> None:
        """`tailer` no longer reads `file` (it was truncated, or the tailer is done)."""
        if self.owners.get(file) is tailer:
            del self.owners[file]

    def _open(self, item: Found) -> None:
        try:
            fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("file_unreadable", source=item.source, path=item.path, error=str(exc),
                        action="check the agent's permissions; retried at the next scan")
            return
        st = os.fstat(fd)
        key = (item.source, st.st_dev, st.st_ino)
        if key in self.live:
            os.close(fd)
            return
        tailer = Tailer(self.sources[item.source], item.path, fd, self._scans == 1, self)
        self.live[key] = tailer
        self.by_path.setdefault(item.path, set()).add(tailer)
        task = self.spawn(tailer.run())
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(key, tailer, t))

    def _done(self, key: tuple[str, int, int], tailer: Tailer, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.live.pop(key, None)
        self._unindex(tailer)

    def _unindex(self, tailer: Tailer) -> None:
        tailers = self.by_path.get(tailer.path)
        if tailers is not None:
            tailers.discard(tailer)
            if not tailers:
                del self.by_path[tailer.path]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel("agent stopping")
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _first_of(wanted: asyncio.Event, other: asyncio.Event) -> bool:
    """Wait for either event; True if `wanted` is set."""
    waits = {asyncio.ensure_future(wanted.wait()), asyncio.ensure_future(other.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
    return wanted.is_set()
