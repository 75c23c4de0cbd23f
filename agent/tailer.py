"""Following files: one `Tailer` per open file, and the `TailerSet` that keeps them by identity.

A tailer owns one file descriptor, opened off the event loop and only if it
is a regular file (`identity.open_regular`). Woken by an inotify hint, a poll
or a rescan, it observes the file (fstat, and whether the bytes before its
read position are still the ones read) and lets `follow.reconcile` decide
what that means: read on, read again from 0 (truncated), or release. It
reads whatever was appended in chunks off the event loop, frames complete
lines (and multi-line events) and hands them on in file order. It reads from
the file it opened, not from the name, so a renamed (rotated) file is read to
its end; a file that leaves every glob, or is deleted, is read to its end and
then closed, so its disk space is freed. Its descriptor is closed only once
no read in a thread can still be using it.

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

At start, files the offsets know that were renamed out of every glob while
the agent was stopped, with lines still unread, are found in their last
folder and read to their end (`TailerSet.recover`).

A reload (`TailerSet.stop_sources`, `add_sources`) stops the tailers of
removed and changed sources between chunks, where every line they read is
handed on but a multi-line event still being assembled, and a changed source's
new tailer takes over each file where the old one stopped, keeping the
documents still waiting for an ack (`claim`): nothing handed on is read
again, and everything after is read with the new configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from agent.config import SourceConfig, StartAt
from agent.follow import Action, FollowState, Seen, draining, reconcile
from agent.identity import (
    MARKER_BYTES,
    NotFollowable,
    fingerprint,
    last_line_end,
    marker,
    open_regular,
    read_fingerprint,
    read_marker,
)
from agent.lines import splitter_for
from agent.multiline import MultilineAssembler
from agent.offsets import MIN_COPY_OFFSET, FileProgress, OffsetStore, SaveBarrier
from agent.types import FILE_START, Checkpoint, FileId, Lines, LineSink, SourceFile

READ_CHUNK = 256 * 1024
COPY_GROWTH_WAIT = 30.0
"""Seconds a file that may be a copy still being written is given to grow before it is taken
for a new file: logrotate's copy is found while `cp` still writes it, shorter than every point
it could be checked at, and read as new it would ship everything again. Long enough for a `cp`
stalled by a busy disk; it only delays a new log whose bytes so far are all the original's
(a banner, with nothing after it yet)."""
COPY_GROWTH_POLL = 0.1
STOP_WAIT = 10.0
"""Seconds a reload waits for a tailer to stop where everything it read is handed on (it may
wait for room in a full queue); past that it is cancelled and its file is read again from the
committed offset (the same `_id`s: CouchDB answers conflict)."""
IN_FLIGHT_WAIT = 5.0
"""Seconds a stopping tailer waits for a read still running in its thread (a hung NFS mount
never returns); past that the descriptor is closed when the read returns, never before."""
log = structlog.get_logger("agent.tailer")

Spawn = Callable[["Tailer"], "asyncio.Task[None]"]
"""Starts a tailer's `run` as a task (the Agent's: supervised)."""
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Found:
    """A file a source's globs matched in a scan, with its size then."""

    source: str
    path: str
    dev: int
    ino: int
    size: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path a source's globs matched that is not followed, and why (a symlink, a FIFO...)."""

    source: str
    path: str
    reason: str


class Wakeup:
    """A flag one task waits on: `asyncio.Event` for a single waiter, without the Event's deque
    of waiters and instance dict (a tailer waits on one for the whole life of its file, and
    there may be thousands)."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = True
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set, for at most `timeout` seconds, then clear it; False if the timeout
        came first."""
        woken = True
        if not self._set:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    async with asyncio.timeout(timeout):
                        await self._waiter
            except TimeoutError:
                woken = False
            finally:
                self._waiter = None
        self._set = False
        return woken


class Tailer:
    # Slots: one instance per followed file, and an instance dict costs more than its fields.
    __slots__ = ("_in_flight", "_let_go", "_recent", "_released", "_unlisted", "_wake",
                 "at_first_start", "fd", "file", "handed_over", "key", "listed", "multiline",
                 "owner", "path", "recovered", "seen_size", "source", "splitter", "state",
                 "stopping")

    def __init__(self, source: SourceConfig, path: str, key: tuple[str, int, int],
                 at_first_start: bool, owner: TailerSet, listed: bool = True) -> None:
        self.source = source
        self.path = path
        self.key = key
        self.fd = -1
        self.at_first_start = at_first_start
        self.owner = owner
        self.state = FollowState.ACTIVE
        self.listed = listed
        """Whether the last scan found the file at a path the source's globs match."""
        self.recovered = not listed
        """Found at start outside the globs, unfinished: read to its end and released at once."""
        self.file: SourceFile | None = None
        """The offsets this tailer reads under; None until its first line is complete."""
        self.splitter = splitter_for(source.encoding, source.max_line_bytes)
        self.multiline = self._assembler()
        self.seen_size = -1
        self._recent = b""
        """The last MARKER_BYTES read, ending at `splitter.position`."""
        self._wake = Wakeup()
        self._in_flight: asyncio.Future[Any] | None = None
        """The blocking call running in a thread for this tailer, if any."""
        self.stopping = False
        """A reload asked this tailer to stop at the next point where all it read is handed on."""
        self.handed_over = False
        """It stopped there: its successor may go on from the last line handed on."""
        # The two events only a copy waiting for its original needs: made when first asked for.
        self._unlisted: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._let_go = False
        """Whether this tailer let go of its file's offsets (truncated, or done)."""

    @property
    def log(self) -> Any:
        """The logger bound to this file, made per use: files log rarely, and a bound logger
        kept per file costs more than the tailer's own fields."""
        if self.file is None:
            return log.bind(source=self.source.name, path=self.path)
        return log.bind(source=self.source.name, path=self.path, file_id=str(self.file.file_id))

    @property
    def unlisted(self) -> asyncio.Event:
        """Set while `listed` is False: a copy waiting for its original gives up then."""
        if self._unlisted is None:
            self._unlisted = asyncio.Event()
            if not self.listed:
                self._unlisted.set()
        return self._unlisted

    @property
    def released(self) -> asyncio.Event:
        """Set when this tailer stops owning its file's offsets (truncated, or done)."""
        if self._released is None:
            self._released = asyncio.Event()
            if self._let_go:
                self._released.set()
        return self._released

    def _assembler(self) -> MultilineAssembler | None:
        ml = self.source.multiline
        return None if ml is None else MultilineAssembler(ml.start, ml.max_bytes, self.source.encoding)

    def wake(self) -> None:
        self._wake.set()

    def unlink(self) -> None:
        """The last scan did not find the file at any path the globs match."""
        self.listed = False
        if self._unlisted is not None:
            self._unlisted.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop once everything read is handed on (a reload); `run` then returns."""
        self.stopping = True
        # A copy waiting for its original gives up: there is nothing to hand over yet.
        self.unlisted.set()
        self._wake.set()

    def relist(self) -> None:
        """The last scan found the file at a path the globs match."""
        self.listed = True
        self.recovered = False
        if self._unlisted is not None:
            self._unlisted.clear()
        self._wake.set()

    def rename(self, path: str) -> None:
        self.log.info("file_renamed", new_path=path)
        self.path = path

    async def run(self) -> None:
        try:
            if await self._open():
                await self._follow()
        finally:
            await self._close()

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in a thread. A cancelled `to_thread` keeps running, so the call is
        remembered until it returns: the descriptor it uses is closed only after that."""
        work = asyncio.ensure_future(asyncio.to_thread(call, *args))
        # Its error is the caller's to see; once the caller is cancelled, nobody's.
        work.add_done_callback(_retrieve)
        # Forgotten once done: a finished call holds its result (a whole chunk), and a tailer
        # waiting for the read budget must hold none (1,000 files: 1,000 chunks, 250 MiB).
        work.add_done_callback(self._forget)
        self._in_flight = work
        result: T = await asyncio.shield(work)
        return result

    def _forget(self, work: asyncio.Future[Any]) -> None:
        if self._in_flight is work:
            self._in_flight = None

    async def _open(self) -> bool:
        """Open the file in a thread (a hung NFS mount stalls only this file). False if it
        cannot be followed (said once per path) or is no longer the file the scan found."""
        try:
            self.fd, st = await self._blocking(open_regular, self.path,
                                               self.source.follow_symlinks)
        except NotFollowable as exc:
            self.owner.skip(Skipped(self.source.name, self.path, exc.reason))
            return False
        except FileNotFoundError:
            # Deleted or renamed since the scan (a rotation): routine, and no reason to skip it.
            self.log.debug("file_gone_before_open", action="the next scan finds it if it is back")
            return False
        except OSError as exc:
            self.owner.skip(Skipped(self.source.name, self.path, f"unreadable: {exc.strerror}"))
            return False
        if (st.st_dev, st.st_ino) != self.key[1:]:
            self.log.debug("file_replaced_before_open", action="the next scan finds the new file")
            return False
        return True

    async def _close(self) -> None:
        """Release the offsets and close the descriptor, once no read can still be using it."""
        try:
            work = self._in_flight
            if work is not None and not work.done():
                await asyncio.wait({work}, timeout=IN_FLIGHT_WAIT)
        finally:
            self._release()
            self.state = FollowState.RELEASED
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                work = self._in_flight
                if work is None or work.done():
                    os.close(fd)
                else:
                    work.add_done_callback(lambda _: os.close(fd))

    async def _follow(self) -> None:
        last_growth = time.monotonic()
        changed = False  # a read found the bytes before its position changed: rewritten
        while True:
            woken = await self._wake.wait(self._timeout())
            if self.stopping:
                # A multi-line event still being assembled is not handed on: it starts where
                # the last one handed on ends, so the successor reads it whole.
                self.handed_over = True
                return
            action, size = await self._look(changed, last_growth)
            changed = False
            if action is Action.RELEASE:
                await self._finish()
                return
            if action is Action.RESTART:
                await self._truncated(size)
                self._wake.set()
                continue
            if self.file is None:
                continue
            grew = await self._read_to_end()
            if grew is None:
                changed = True
                self._wake.set()
                continue
            if grew:
                last_growth = time.monotonic()
                if draining(self.state):
                    # Read to its end: the next observation says at once whether it is drained.
                    self._wake.set()
            elif not woken and self.multiline is not None and self.multiline.pending:
                await self._flush_event()

    async def _look(self, changed: bool, last_growth: float) -> tuple[Action, int]:
        """Observe the file, claim its offsets once its first line is complete, and decide what
        the observation means; return the action and the size seen. (Its own call, so that the
        stat result is not kept in `_follow`'s frame while the tailer waits.)"""
        st, marker_ok = await self._blocking(self._observe)
        self.seen_size = st.st_size
        if self.file is None:
            await self._identify(st)
        position = self.splitter.position if self.file is not None else st.st_size
        before = self.state
        self.state, action = reconcile(before, Seen(
            st.st_size, st.st_nlink, position, marker_ok and not changed, self.listed,
            self.recovered or self._idle(last_growth)))
        self._log_transition(before, st.st_size)
        return action, st.st_size

    def _observe(self) -> tuple[os.stat_result, bool]:
        """fstat, and whether the bytes before the read position are still the ones read (at
        position 0, whether the first line is). Blocking."""
        st = os.fstat(self.fd)
        if self.file is None:
            return st, True
        position, recent = self.splitter.position, self._recent
        if recent:
            return st, os.pread(self.fd, len(recent), position - len(recent)) == recent
        return st, read_fingerprint(self.fd) == self.file.file_id.fingerprint

    def _log_transition(self, before: FollowState, size: int) -> None:
        if self.state is before or self.state is FollowState.ACTIVE:
            return
        if self.state is FollowState.ROTATED_DRAINING:
            self.log.info("file_rotated", offset=self.splitter.position, size=size,
                          action="reading it to its end, then releasing it after rotate_wait "
                          "without growth")
        elif self.state is FollowState.DELETED_DRAINING:
            self.log.info("file_deleted", offset=self.splitter.position, size=size,
                          action="reading it to its end, then releasing it")

    def _timeout(self) -> float | None:
        """How long to wait to be woken before looking anyway (rotation, multiline), if at all."""
        timeouts = []
        if draining(self.state):
            timeouts.append(self.source.rotate_wait)
        if self.multiline is not None and self.multiline.pending and self.source.multiline:
            timeouts.append(self.source.multiline.timeout)
        return min(timeouts) if timeouts else None

    def _idle(self, last_growth: float) -> bool:
        return time.monotonic() - last_growth >= self.source.rotate_wait

    async def _identify(self, st: os.stat_result) -> None:
        """Claim offsets for the file once its first line is complete (else try again later)."""
        fingerprint = await self._blocking(read_fingerprint, self.fd)
        if fingerprint is None:
            return
        claim = await self.owner.claim(self, SourceFile(self.source.name,
                                                        FileId(st.st_dev, st.st_ino, fingerprint)),
                                       st.st_size)
        if claim is None:
            return
        self.at_first_start = False
        self.file, offset = claim
        self.splitter = splitter_for(self.source.encoding, self.source.max_line_bytes, offset)
        self._recent = await self._blocking(os.pread, self.fd, min(offset, MARKER_BYTES),
                                            max(0, offset - MARKER_BYTES))
        self.log.info("file_opened", offset=offset, size=st.st_size)

    async def marker_matches(self, offset: int, expected: str | None) -> bool:
        """Whether the bytes before `offset` in this file hash to `expected`."""
        if expected is None:
            return True
        return await self._blocking(read_marker, self.fd, offset) == expected

    async def _truncated(self, size: int) -> None:
        self.log.warning("file_truncated", offset=self.splitter.position, size=size,
                         action="reading it again from the start")
        await self._flush_event()
        self._release()
        self._released, self._let_go = None, False
        self.file = None
        self.splitter = splitter_for(self.source.encoding, self.source.max_line_bytes)
        self.multiline = self._assembler()
        self._recent = b""

    async def _read_to_end(self) -> bool | None:
        """Read and hand on every complete line up to the end of the file. True if it grew,
        False if not, None if it was rewritten (truncated and written again) under us."""
        grew = False
        while True:
            # Before the budget is taken: a tailer waiting for a save holds none.
            limit = await self._cover()
            if limit is None:
                return grew
            # The budget shared by all tailers is held from the read until the chunk's
            # documents are queued: that is when a chunk takes memory. The chunk lives only in
            # the call, so a tailer waiting for the budget holds none.
            async with self.owner.read_budget:
                read = await self._read_and_hand_on(limit)
            if not read:
                return None if read is None else grew
            grew = True
            if self.stopping:
                return grew

    async def _cover(self) -> int | None:
        """How many bytes the next read may take; None if the tailer stops meanwhile.

        A file's documents go out only once the saved state can recognize a copy of it: a
        kill -9 before the next save, then copy-truncate, would ship the copy again under new
        ids. Once per file, the bytes the next read takes are marked and a save awaited; a
        file too short for a mark (MIN_COPY_OFFSET) is read no further than that meanwhile."""
        assert self.file is not None
        saves, offsets = self.owner.saves, self.owner.offsets
        progress = offsets.get(self.file)
        if saves is None or progress is None or progress.recognizable:
            return READ_CHUNK
        size = (await self._blocking(os.fstat, self.fd)).st_size
        if size < MIN_COPY_OFFSET:
            return max(0, MIN_COPY_OFFSET - self.splitter.position)
        # Marked where the next read ends: past the first line, within what is read.
        mark = max(MIN_COPY_OFFSET, min(size, self.splitter.position + READ_CHUNK))
        offsets.mark_read(self.file, Checkpoint.at(mark, await self._blocking(read_marker,
                                                                              self.fd, mark)))
        if not await saves.wait(lambda: self.stopping):
            return None
        offsets.covered(self.file)
        return READ_CHUNK

    async def _read_and_hand_on(self, limit: int = READ_CHUNK) -> bool | None:
        """Read one chunk (at most `limit` bytes) and hand on its complete lines. True if there
        was one, False at the end of the file, None if it was rewritten."""
        data = await self._blocking(self._read_chunk, limit)
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

    def _read_chunk(self, limit: int = READ_CHUNK) -> bytes | None:
        """The next chunk, or None if the file no longer holds what was read. One pread takes the
        bytes before the read position too, so the check and the read see the same file (the
        start of the file is checked against the fingerprint). Blocking."""
        assert self.file is not None
        position, recent = self.splitter.position, self._recent
        raw = os.pread(self.fd, limit + len(recent), position - len(recent))
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
            end_marker = await self._blocking(read_marker, self.fd, lines[-1].end)
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
                                 await self._blocking(read_marker, self.fd, event.end))

    async def _finish(self) -> None:
        """The file is done: its unterminated last line, if any, is a line too."""
        line = self.splitter.flush() if self.file is not None else None
        if line is not None:
            await self._hand_on(Lines.of([line]),
                                await self._blocking(read_marker, self.fd, line.end))
        await self._flush_event()
        unread = self.seen_size - self.splitter.position
        self.log.info("file_released", offset=self.splitter.position, unread_bytes=max(unread, 0))

    def reference(self) -> Checkpoint:
        """How far this tailer has read, and the marker there."""
        return Checkpoint.at(self.splitter.position, marker(self._recent) if self._recent else None)

    def _release(self) -> None:
        if self.file is not None:
            self.owner.offsets.detach(self.file, self.reference())
            self.owner.let_go(self, self.file)
        self._let_go = True
        if self._released is not None:
            self._released.set()


class TailerSet:
    """The live tailers, keyed by (source, device, inode); reconciles them with each scan and
    decides where each file is read from (`claim`)."""

    def __init__(self, spawn: Spawn, sources: Iterable[SourceConfig], sinks: dict[str, LineSink],
                 offsets: OffsetStore, start_at: dict[str, StartAt],
                 read_budget: contextlib.AbstractAsyncContextManager[Any] | None = None,
                 saves: SaveBarrier | None = None) -> None:
        self.read_budget = read_budget or contextlib.nullcontext()
        """Held while a chunk is read and handed on (the Agent's, shared by all tailers)."""
        self.saves = saves
        """Where tailers wait for the offsets to be saved (`Tailer._cover`); None: never."""
        self.spawn = spawn
        self.sources = {s.name: s for s in sources}
        self.sinks = sinks
        self.offsets = offsets
        self.start_at = start_at
        """Where files found by the first scan and unknown to the offsets start, per source."""
        self.live: dict[tuple[str, int, int], Tailer] = {}
        self.owners: dict[SourceFile, Tailer] = {}
        """Which tailer reads each file now."""
        self.by_path: dict[str, list[Tailer]] = {}
        """The same file may be followed by several sources. Lists: nearly all hold one tailer,
        and a one-item set takes four times the memory (a thousand files: a few hundred KiB)."""
        self.skipped: dict[tuple[str, str], str] = {}
        """(source, path) -> why it is not followed: each is logged once, while the path lasts."""
        self.running: dict[Tailer, asyncio.Task[None]] = {}
        """Each tailer's task, until it is done."""
        self._scans = 0
        self.handovers: dict[SourceFile, Checkpoint] = {}
        """Files a tailer stopped by a reload left with everything it read handed on: the end
        of the last line handed on, where its successor goes on."""
        self._first_scan: set[str] = set()
        """Sources added by a reload whose files have not been scanned yet: like files found at
        the first start, they begin where the source's `start_at` says."""
        self._closed = False

    def reconcile(self, found: Iterable[Found], scanned: Iterable[str],
                  skipped: Iterable[Skipped] = ()) -> None:
        """Start tailers for new files, follow renames, wake tailers whose file changed, and let
        go of files the scanned sources' globs no longer match."""
        self._scans += 1
        found = list(found)
        paths = {(item.source, item.path) for item in found}
        seen = set()
        for item in found:
            if item.source not in self.sources:
                # Scanned before a reload removed the source (or while it is being changed).
                continue
            key = (item.source, item.dev, item.ino)
            if key in seen:
                continue  # a hard link of a file already handled in this scan
            seen.add(key)
            tailer = self.live.get(key)
            if tailer is None:
                self._open(item)
                continue
            if (item.source, tailer.path) not in paths:
                self._unindex(tailer)
                tailer.rename(item.path)
                self.by_path.setdefault(item.path, []).append(tailer)
            changed = item.size != tailer.seen_size
            if item.size > tailer.seen_size:
                # A tailer paused by a full spool does not look at its file: the scan's size
                # keeps its bytes behind (status, metrics) true while it waits.
                tailer.seen_size = item.size
            if not tailer.listed:
                tailer.relist()
            elif changed or tailer.file is None:
                tailer.wake()
        for skip in skipped:
            paths.add((skip.source, skip.path))
            self.skip(skip)
        sources = set(scanned)
        for key, tailer in self.live.items():
            if key[0] in sources and key not in seen and tailer.listed:
                tailer.unlink()
        for gone in [k for k in self.skipped if k[0] in sources and k not in paths]:
            del self.skipped[gone]
        self._first_scan -= sources

    def skip(self, skipped: Skipped) -> None:
        """A path is not followed: say so once (again only if the reason changes)."""
        key = (skipped.source, skipped.path)
        if self.skipped.get(key) != skipped.reason:
            self.skipped[key] = skipped.reason
            log.warning("file_skipped", source=skipped.source, path=skipped.path,
                        reason=skipped.reason,
                        action="only regular files are followed (symlinks to them with "
                        "follow_symlinks: true); fix the path or the globs")

    def hint(self, path: str) -> None:
        for tailer in self.by_path.get(path, ()):
            tailer.wake()

    async def claim(self, tailer: Tailer, file: SourceFile, size: int) -> tuple[SourceFile, int] | None:
        """Decide which offsets `tailer` reads `file` with, and from where (module docstring).
        None if the tailer was unlinked or stopped while waiting for a copy's original, or for
        a copy to grow."""
        store = self.offsets
        while True:
            known = store.latest(file)
            if known is not None:
                progress = store.get(known)
                assert progress is not None
                reader = self.owners.get(known)
                handover = self.handovers.pop(known, None)
                if handover is not None and reader is None and handover.offset <= size and \
                        await tailer.marker_matches(handover.marker_offset, handover.marker):
                    return self._take_over(tailer, known, progress, handover)
                # A copy of this file that adopted its offsets reads them now: this file was
                # rewritten, whatever its bytes say.
                if (reader is None or reader is tailer) and progress.committed <= size and \
                        await tailer.marker_matches(progress.checkpoint.marker_offset,
                                                    progress.checkpoint.marker) and \
                        await _still_holds(tailer, progress.read, size):
                    return self._attach(tailer, known, progress.checkpoint)
                rewritten = known.file_id.next_generation()
                tailer.log.warning("file_rewritten", committed=progress.committed, size=size,
                                   generation=rewritten.generation,
                                   action="reading it from the start")
                return self._attach(tailer, SourceFile(file.source, rewritten),
                                    FILE_START)
            waited = False
            short = False
            for original in store.copies_of(file):
                progress = store.get(original)
                assert progress is not None
                owner = self.owners.get(original)
                if not await self._is_copy(tailer, progress, owner, size):
                    short = short or await _may_be_partial_copy(tailer, original, progress,
                                                                owner, size)
                    continue
                # Looked up again: the check awaited, and the original may have been let go
                # meanwhile (truncated); waiting on the tailer that let go would wait for ever.
                owner = self.owners.get(original)
                if owner is not None:
                    tailer.log.info("copy_detected", original=owner.path,
                                    action="waiting until the original is let go")
                    if not await _first_of(owner.released, tailer.unlisted):
                        return None
                    waited = True
                    break
                tailer.log.info("copy_adopted", original=progress.path, offset=progress.committed)
                return self._attach(tailer, original, progress.checkpoint)
            if waited:
                # The copy went on growing while its original was read to its end: checked
                # at its old size, every point is past it and the original is gone.
                size = (await tailer._blocking(os.fstat, tailer.fd)).st_size
                continue
            if short:
                grown = await _grown(tailer, size)
                if grown is not None:
                    size = grown
                    continue
                if tailer.stopping or not tailer.listed:
                    # Gone or stopped while it may still be a copy: its bytes so far are the
                    # original's, and read as new they would be shipped again.
                    return None
            offset = 0
            if tailer.at_first_start and self.start_at[file.source] == "end":
                newline = "\n".encode(tailer.source.encoding)
                offset = await tailer._blocking(last_line_end, tailer.fd, size, newline)
            return self._attach(tailer, file, Checkpoint(offset, offset, None))

    @staticmethod
    async def _is_copy(tailer: Tailer, original: FileProgress, owner: Tailer | None,
                       size: int) -> bool:
        """Whether the tailer's file holds the original's bytes before a known offset: the
        committed one, or where its reader is (or stopped). The offset must lie past the
        fingerprinted first line, so that files that merely start with the same banner are
        never taken for copies."""
        references = _references(original, owner)
        for point in references:
            if point.marker is not None and MIN_COPY_OFFSET <= point.marker_offset <= size and \
                    await tailer.marker_matches(point.marker_offset, point.marker):
                return True
        tailer.log.debug("not_a_copy", original=original.path,
                         references=[tuple(point) for point in references], size=size,
                         owner_live=owner is not None)
        return False

    def _attach(self, tailer: Tailer, file: SourceFile,
                start: Checkpoint) -> tuple[SourceFile, int]:
        self.offsets.attach(file, tailer.path, start)
        self.owners[file] = tailer
        return file, start.offset

    def _take_over(self, tailer: Tailer, file: SourceFile, progress: FileProgress,
                   point: Checkpoint) -> tuple[SourceFile, int]:
        """Go on reading `file` where a tailer stopped by a reload handed on its last line. Not
        `OffsetStore.attach`, which starts afresh: the documents that tailer queued are still
        waiting for their acks in `progress`, and the committed offset must keep waiting for
        them."""
        progress.live = True
        progress.path = tailer.path
        progress.updated = time.time()
        self.owners[file] = tailer
        tailer.log.info("file_taken_over", offset=point.offset, committed=progress.committed)
        return file, point.offset

    def let_go(self, tailer: Tailer, file: SourceFile) -> None:
        """`tailer` no longer reads `file` (it was truncated, or the tailer is done)."""
        if self.owners.get(file) is tailer:
            del self.owners[file]

    def _open(self, item: Found, listed: bool = True) -> None:
        """Start a tailer for a file a scan found; it opens the file itself, off the loop."""
        if self._closed:
            return
        key = (item.source, item.dev, item.ino)
        first = self._scans == 1 or item.source in self._first_scan
        tailer = Tailer(self.sources[item.source], item.path, key, first, self, listed)
        self.live[key] = tailer
        self.by_path.setdefault(item.path, []).append(tailer)
        task = self.spawn(tailer)
        self.running[tailer] = task
        task.add_done_callback(functools.partial(self._done, tailer))

    async def recover(self) -> None:
        """Follow the files the offsets know that were renamed out of every glob while the
        agent was stopped with lines still unread: each is looked for in its last folder by
        device, inode and fingerprint, read to its end, then released. Call after the first
        scan, so that the files still in the globs are followed as usual."""
        known = [(f, p) for f, p in self.offsets.files.items() if f.source in self.sources]
        unfinished = await asyncio.to_thread(_find_unfinished, known, set(self.live))
        for item in unfinished:
            if (item.source, item.dev, item.ino) not in self.live:
                log.info("unfinished_file_found", source=item.source, path=item.path,
                         size=item.size, action="reading it to its end, then releasing it")
                self._open(item, listed=False)

    def _done(self, tailer: Tailer, task: asyncio.Task[None]) -> None:
        self.running.pop(tailer, None)
        if self.live.get(tailer.key) is tailer:
            del self.live[tailer.key]
        self._unindex(tailer)

    def _unindex(self, tailer: Tailer) -> None:
        tailers = self.by_path.get(tailer.path)
        if tailers is not None and tailer in tailers:
            tailers.remove(tailer)
            if not tailers:
                del self.by_path[tailer.path]

    async def stop_sources(self, names: Iterable[str]) -> int:
        """A reload removes or changes these sources: no file of theirs is opened until
        `add_sources` names them again, and their tailers stop where everything they read is
        handed on (`Tailer.stop`), or are cancelled after STOP_WAIT. Returns how many stopped."""
        names = set(names)
        for name in names:
            self.sources.pop(name, None)
            self.start_at.pop(name, None)
            for key in [k for k in self.skipped if k[0] == name]:
                del self.skipped[key]
            for file in [f for f in self.handovers if f.source == name]:
                del self.handovers[file]
        stopping = {t: task for t, task in self.running.items() if t.source.name in names}
        for tailer in stopping:
            tailer.stop()
        late: set[asyncio.Task[None]] = set()
        if stopping:
            _, late = await asyncio.wait(stopping.values(), timeout=STOP_WAIT)
        for task in late:
            task.cancel("reload: the tailer did not stop in time")
        if late:
            log.warning("tailers_cancelled", count=len(late), waited=STOP_WAIT,
                        action="their files are read again from the committed offsets (CouchDB "
                        "answers conflict for what it has)")
            await asyncio.gather(*late, return_exceptions=True)
        for tailer, task in stopping.items():
            if task in late or not tailer.handed_over or tailer.file is None:
                continue
            progress = self.offsets.get(tailer.file)
            if progress is not None:
                self.handovers[tailer.file] = progress.marks[-1] if progress.marks else \
                    progress.checkpoint
        # Only now: a stopping tailer hands on what it read through its source's sink.
        for name in names:
            self.sinks.pop(name, None)
        return len(stopping)

    def add_sources(self, sources: Iterable[SourceConfig], sinks: dict[str, LineSink],
                    start_at: dict[str, StartAt], new: Iterable[str]) -> None:
        """A reload adds or changes these sources; the next scan opens their files. The
        sources in `new` were not there before: their files start where `start_at` says."""
        for source in sources:
            self.sources[source.name] = source
        self.sinks.update(sinks)
        self.start_at.update(start_at)
        self._first_scan.update(new)

    async def stop(self) -> None:
        """Stop every tailer; each waits for a read still running in its thread first."""
        self._closed = True
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel("agent stopping")
        await asyncio.gather(*tasks, return_exceptions=True)


def _find_unfinished(known: Iterable[tuple[SourceFile, FileProgress]],
                     live: set[tuple[str, int, int]]) -> list[Found]:
    """The known files not followed now, found in their last folder (same device, inode and
    fingerprint) with more bytes than were committed. Blocking."""
    wanted: dict[str, dict[tuple[int, int], list[tuple[SourceFile, FileProgress]]]] = {}
    for file, progress in known:
        fid = file.file_id
        if (file.source, fid.dev, fid.ino) not in live:
            wanted.setdefault(os.path.dirname(progress.path), {}).setdefault(
                (fid.dev, fid.ino), []).append((file, progress))
    found: dict[tuple[str, int, int], Found] = {}
    for folder, files in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                candidates = [(f, p) for f, p in files.get((st.st_dev, st.st_ino), ())
                              if p.committed < st.st_size]
                if not candidates or not entry.is_file(follow_symlinks=False):
                    continue
                fd, _ = open_regular(entry.path, follow_symlinks=False)
            except (OSError, NotFollowable):
                continue
            try:
                head = read_fingerprint(fd)
            except OSError:
                continue
            finally:
                os.close(fd)
            for file, _progress in candidates:
                if file.file_id.fingerprint == head:
                    found[(file.source, st.st_dev, st.st_ino)] = Found(
                        file.source, entry.path, st.st_dev, st.st_ino, st.st_size)
    return list(found.values())


def _references(original: FileProgress, owner: Tailer | None) -> list[Checkpoint]:
    """The points a copy of `original` is checked at: its committed offset, its saved read mark,
    and where its reader is now, if it has one; only those with a marker."""
    points = [original.checkpoint, original.read] + ([owner.reference()] if owner is not None else [])
    return [point for point in points if point.marker is not None]


async def _may_be_partial_copy(tailer: Tailer, file: SourceFile, original: FileProgress,
                               owner: Tailer | None, size: int) -> bool:
    """Whether the tailer's file may be a copy of `original` still being written: shorter than
    every point a copy is checked at (a point within it that did not match says it is no copy),
    and holding the same bytes before its end as the original, read now. A new log that merely
    starts with the same banner differs there as soon as it has more than the banner, so it
    is not held back while it grows. The original is read at its last path also while no
    tailer reads it (a reload or a start hands it on): it is still there, whole, until the
    copy is."""
    usable = [p.marker_offset for p in _references(original, owner)
              if p.marker_offset >= MIN_COPY_OFFSET]
    if not usable or min(usable) <= size:
        return False
    path = owner.path if owner is not None else original.path
    ours = await tailer._blocking(read_marker, tailer.fd, size)
    theirs = await tailer._blocking(_marker_in, path, tailer.source.follow_symlinks,
                                    (file.file_id.dev, file.file_id.ino), size)
    return ours == theirs


def _marker_in(path: str, follow_symlinks: bool, identity: tuple[int, int],
               offset: int) -> str | None:
    """The marker at `offset` of the file at `path`, if it is still the file with this device
    and inode and holds that many bytes; else None. Opened apart from its tailer, whose
    descriptor only it may use. Blocking."""
    try:
        fd, st = open_regular(path, follow_symlinks)
    except (OSError, NotFollowable):
        return None
    try:
        if (st.st_dev, st.st_ino) != identity or st.st_size < offset:
            return None
        return read_marker(fd, offset)
    finally:
        os.close(fd)


async def _grown(tailer: Tailer, size: int) -> int | None:
    """The file's new size once it grows past `size`; None if it stays put for
    COPY_GROWTH_WAIT (or the tailer is asked to stop, or its file leaves the globs)."""
    deadline = time.monotonic() + COPY_GROWTH_WAIT
    while time.monotonic() < deadline and not tailer.stopping and tailer.listed:
        await asyncio.sleep(COPY_GROWTH_POLL)
        now = (await tailer._blocking(os.fstat, tailer.fd)).st_size
        if now > size:
            return now
    return None


async def _still_holds(tailer: Tailer, point: Checkpoint, size: int) -> bool:
    """Whether the file still holds `point`, a point it held when it was read (the saved read
    mark). After a kill -9 the committed offset may lag far behind the lines shipped (to 0, with
    nothing to check); a file truncated and written again since, starting with the same first
    line, agrees with it, and resuming there would give new lines the ids of lines CouchDB has
    (answered conflict: lost). An append-only file never gets shorter than a point it held."""
    if point.marker is None:
        return True
    return point.marker_offset <= size and await tailer.marker_matches(point.marker_offset,
                                                                       point.marker)


def _retrieve(work: asyncio.Future[Any]) -> None:
    if not work.cancelled():
        work.exception()


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
