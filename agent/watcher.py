"""Discovery: which files each source's globs match now, and hints when they change.

Two backends behind one loop. With inotify (through watchdog) a change to a
followed file wakes its tailer and a new, moved or deleted name triggers a
rescan; a full rescan still runs every `scan_interval` as a safety net for
missed events. When inotify cannot be had (no support, or the watch limit),
the watcher says so in the log and polls: a rescan, which also wakes every
tailer, every `poll_interval`.

An inotify event is only a hint: the truth is always what fstat and the next
scan say.
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from agent.config import SourceConfig
from agent.tailer import Found

log = structlog.get_logger("agent.watcher")
_GLOB_CHARS = frozenset("*?[")
RELEVANT = frozenset({EVENT_TYPE_MODIFIED, EVENT_TYPE_CREATED, EVENT_TYPE_DELETED,
                      EVENT_TYPE_MOVED})


def scan(sources: Sequence[SourceConfig]) -> list[Found]:
    """Every regular file the sources' globs match now, in a stable order. Blocking."""
    found = []
    for source in sources:
        paths = sorted({p for pattern in source.paths for p in glob.glob(pattern, recursive=True)})
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if os.path.isfile(path):
                found.append(Found(source.name, path, st.st_dev, st.st_ino))
    return found


def watch_roots(patterns: Iterable[str]) -> dict[str, bool]:
    """The folders to watch for `patterns`, each with whether it must be watched recursively.

    A missing folder is replaced by its nearest existing ancestor, watched
    recursively, so a log folder created later is still noticed.
    """
    roots: dict[str, bool] = {}
    for pattern in patterns:
        parts = Path(pattern).parts
        fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
        base = Path(*parts[: min(fixed, len(parts) - 1)]) if len(parts) > 1 else Path(".")
        recursive = fixed < len(parts) - 1
        while not base.is_dir() and base != base.parent:
            base, recursive = base.parent, True
        key = str(base)
        roots[key] = roots.get(key, False) or recursive
    return roots


class _Hints(FileSystemEventHandler):
    """Runs in watchdog's thread; hands paths to the loop, coalescing bursts of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[set[str]], None]) -> None:
        self.loop = loop
        self.deliver = deliver
        self.lock = threading.Lock()
        self.pending: set[str] = set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in RELEVANT or event.is_directory:
            return
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        with self.lock:
            first = not self.pending
            self.pending.update(paths)
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            paths, self.pending = self.pending, set()
        self.deliver(paths)


class Watcher:
    def __init__(self, sources: Sequence[SourceConfig], on_scan: Callable[[list[Found]], None],
                 on_change: Callable[[str], None], scan_interval: float,
                 poll_interval: float = 1.0) -> None:
        self.sources = sources
        self.on_scan = on_scan
        self.on_change = on_change
        self.scan_interval = scan_interval
        self.poll_interval = poll_interval
        self.patterns = [p for s in sources for p in s.paths]
        self.mode = "inotify"
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._watched: dict[str, bool] = {}
        self._rescan = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Hints(loop, self._changed)
        try:
            while True:
                if self.mode == "inotify":
                    await asyncio.to_thread(self._watch, handler)
                found = await asyncio.to_thread(scan, self.sources)
                self.on_scan(found)
                interval = self.scan_interval if self.mode == "inotify" else self.poll_interval
                try:
                    async with asyncio.timeout(interval):
                        await self._rescan.wait()
                except TimeoutError:
                    pass
                self._rescan.clear()
        finally:
            await asyncio.to_thread(self._stop_observer)

    def _changed(self, paths: set[str]) -> None:
        for path in paths:
            self.on_change(path)
            if any(fnmatch.fnmatchcase(path, p) for p in self.patterns):
                self._rescan.set()

    def _watch(self, handler: _Hints) -> None:
        """Add inotify watches for folders that exist now; fall back to polling if we cannot."""
        roots = watch_roots(self.patterns)
        try:
            if self._observer is None:
                self._observer = Observer()
                self._observer.start()
            for root, recursive in roots.items():
                if self._watched.get(root) is None or (recursive and not self._watched[root]):
                    self._observer.schedule(handler, root, recursive=recursive)
                    self._watched[root] = recursive
        except OSError as exc:
            log.warning("inotify_unavailable", error=str(exc), mode="polling",
                        poll_interval=self.poll_interval,
                        action="raise fs.inotify.max_user_watches / max_user_instances "
                        "to get inotify back")
            self.mode = "polling"
            self._stop_observer()

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
