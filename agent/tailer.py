"""Following files: one `Tailer` per open file, and the `TailerSet` that keeps them by identity.

A tailer owns one file descriptor. Woken by an inotify hint or a rescan, it
checks the file (fstat), reads whatever was appended in chunks off the event
loop, frames complete lines and hands them on in file order. It reads from
the file it opened, not from the name, so a renamed (rotated) file is read
to its end; a file that leaves every glob, or is deleted, is read to its end
and then closed, so its disk space is freed.

Tailers are keyed by (source, device, inode), never by path: a known file
seen under a new name is the same file renamed.
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

from agent.identity import identify
from agent.lines import LineSplitter
from agent.types import FileId, LineSink

READ_CHUNK = 256 * 1024
log = structlog.get_logger("agent.tailer")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
Identified = Callable[[FileId, str, int], int]
"""Told a file's identity, path and current size; returns the offset to read from."""
Released = Callable[[FileId], None]


@dataclass(frozen=True, slots=True)
class Found:
    """A file a source's globs matched in a scan."""

    source: str
    path: str
    dev: int
    ino: int


class Tailer:
    def __init__(self, source: str, path: str, fd: int, max_line_bytes: int, rotate_wait: float,
                 sink: LineSink, identified: Identified, released: Released) -> None:
        self.source = source
        self.path = path
        self.fd = fd
        self.max_line_bytes = max_line_bytes
        self.rotate_wait = rotate_wait
        self.sink = sink
        self.identified = identified
        self.released = released
        self.file_id: FileId | None = None
        self.splitter = LineSplitter(max_line_bytes)
        self.unlinked = False
        """The file is no longer at any path the source's globs match (rotated away or deleted)."""
        self._wake = asyncio.Event()
        self._wake.set()
        self.log = log.bind(source=source, path=path)

    def wake(self) -> None:
        self._wake.set()

    def unlink(self) -> None:
        if not self.unlinked:
            self.unlinked = True
            self.log.info("file_unlinked", action="reading to its end, then releasing")
        self._wake.set()

    def rename(self, path: str) -> None:
        self.log.info("file_renamed", new_path=path)
        self.path = path
        self.log = log.bind(source=self.source, path=path)

    async def run(self) -> None:
        try:
            last_growth = time.monotonic()
            while True:
                await self._wait()
                st = await asyncio.to_thread(os.fstat, self.fd)
                if self.file_id is not None and st.st_size < self.splitter.position:
                    self._truncated(st.st_size)
                if self.file_id is None and not await self._identify(st.st_size):
                    if self.unlinked and (st.st_nlink == 0 or self._idle(last_growth)):
                        return
                    continue
                if await self._read_to_end():
                    last_growth = time.monotonic()
                if self.unlinked and (st.st_nlink == 0 or self._idle(last_growth)):
                    await self._finish()
                    return
        finally:
            os.close(self.fd)
            if self.file_id is not None:
                self.released(self.file_id)

    async def _wait(self) -> None:
        if self.unlinked:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rotate_wait):
                    await self._wake.wait()
        else:
            await self._wake.wait()
        self._wake.clear()

    def _idle(self, last_growth: float) -> bool:
        return time.monotonic() - last_growth >= self.rotate_wait

    async def _identify(self, size: int) -> bool:
        file_id = await asyncio.to_thread(identify, self.fd)
        if file_id is None:
            return False
        offset = self.identified(file_id, self.path, size)
        self.file_id = file_id
        self.splitter = LineSplitter(self.max_line_bytes, offset)
        self.log = self.log.bind(file_id=str(file_id))
        self.log.info("file_opened", offset=offset)
        return True

    def _truncated(self, size: int) -> None:
        assert self.file_id is not None
        self.log.warning("file_truncated", offset=self.splitter.position, size=size,
                         action="reading from the start")
        self.released(self.file_id)
        self.file_id = None

    async def _read_to_end(self) -> bool:
        """Read and hand on every complete line up to the end of the file; True if it grew."""
        assert self.file_id is not None
        grew = False
        while True:
            data = await asyncio.to_thread(os.pread, self.fd, READ_CHUNK, self.splitter.position)
            if not data:
                return grew
            grew = True
            lines = self.splitter.feed(data)
            if lines:
                await self.sink(self.file_id, self.path, lines)

    async def _finish(self) -> None:
        """The file is done: its unterminated last line, if any, is a line too."""
        assert self.file_id is not None
        line = self.splitter.flush()
        if line is not None:
            await self.sink(self.file_id, self.path, [line])
        self.log.info("file_released", offset=self.splitter.position)


class TailerSet:
    """The live tailers, keyed by (source, device, inode); reconciles them with each scan."""

    def __init__(self, spawn: Spawn, sinks: dict[str, LineSink], max_line_bytes: dict[str, int],
                 rotate_wait: float, identified: Identified, released: Released) -> None:
        self.spawn = spawn
        self.sinks = sinks
        self.max_line_bytes = max_line_bytes
        self.rotate_wait = rotate_wait
        self.identified = identified
        self.released = released
        self.live: dict[tuple[str, int, int], Tailer] = {}
        self.by_path: dict[str, set[Tailer]] = {}
        """The same file may be followed by several sources."""
        self.tasks: set[asyncio.Task[None]] = set()

    def reconcile(self, found: Iterable[Found]) -> None:
        """Start tailers for new files, follow renames, and let go of files no glob matches."""
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
            tailer.wake()
        for key, tailer in self.live.items():
            if key not in seen:
                tailer.unlink()

    def hint(self, path: str) -> None:
        for tailer in self.by_path.get(path, ()):
            tailer.wake()

    def _open(self, item: Found) -> None:
        try:
            fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("file_unreadable", source=item.source, path=item.path, error=str(exc))
            return
        st = os.fstat(fd)
        key = (item.source, st.st_dev, st.st_ino)
        if key in self.live:
            os.close(fd)
            return
        tailer = Tailer(item.source, item.path, fd, self.max_line_bytes[item.source],
                        self.rotate_wait, self.sinks[item.source], self.identified, self.released)
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
