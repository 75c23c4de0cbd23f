"""Discovery: which files each source's globs match now, and hints when they change.

Two backends behind one loop. With inotify (through watchdog) a change to a
followed file wakes its tailer and a new, moved or deleted name triggers a
rescan; a full rescan still runs every `scan_interval` as a safety net for
missed events. Sources with `watch: poll`, and every source when inotify
cannot be had (no support, or the watch limit, which the log then says),
are rescanned every `poll_interval`; a rescan wakes the tailers whose file
changed size. The one place that chooses between the two is `_watch`.

An inotify event is only a hint: the truth is always what fstat and the next
scan say.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import os
import stat
import threading
import time
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
from watchdog.observers.api import BaseObserver

from agent.config import SourceConfig
from agent.globs import expand
from agent.identity import file_kind
from agent.tailer import Found, Skipped, TailerSet

log = structlog.get_logger("agent.watcher")
_GLOB_CHARS = frozenset("*?[")
RELEVANT = frozenset({EVENT_TYPE_MODIFIED, EVENT_TYPE_CREATED, EVENT_TYPE_DELETED,
                      EVENT_TYPE_MOVED})


def scan(sources: Sequence[SourceConfig],
         state_dir: Path | None = None) -> tuple[list[Found], list[Skipped]]:
    """Every regular file the sources' globs match now, less their exclusions, and the paths
    they match that are not followed, with the reason. Nothing under `state_dir` (the agent's
    own files) is ever followed. Blocking."""
    found, skipped = [], []
    own = os.path.realpath(state_dir) if state_dir is not None else None
    links: dict[str, bool] = {}
    for source in sources:
        bases: dict[str, str] = {}
        pruned: list[str] = []
        for pattern in source.paths:
            for p in expand(pattern, source.follow_symlinks, pruned):
                bases.setdefault(p, _fixed_folder(pattern))
        skipped += [Skipped(source.name, link, "symlinked folder under ** (follow_symlinks is "
                            "false)") for link in sorted(set(pruned)) if link not in bases]
        for path in sorted(bases):
            if excluded(path, source.exclude_paths):
                continue
            try:
                st, reason = _followable(path, source.follow_symlinks)
            except OSError:
                continue
            if reason is None and not source.follow_symlinks and \
                    _through_symlink(path, bases[path], links):
                reason = "in a folder reached through a symlink (follow_symlinks is false)"
            if reason is None and own is not None and _inside(os.path.realpath(path), own):
                reason = "inside the agent's state_dir"
            if reason is None:
                found.append(Found(source.name, path, st.st_dev, st.st_ino, st.st_size))
            else:
                skipped.append(Skipped(source.name, path, reason))
    return found, skipped


def _followable(path: str, follow_symlinks: bool) -> tuple[os.stat_result, str | None]:
    """The path's stat, and why it is not followed (None: it is a regular file to follow)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError as exc:
            return st, "symlink loop" if exc.errno == errno.ELOOP else "dangling symlink"
        if not follow_symlinks:
            return st, f"symlink (to a {file_kind(target.st_mode)}; follow_symlinks is false)"
        if not stat.S_ISREG(target.st_mode):
            return st, f"symlink to a {file_kind(target.st_mode)}"
        return target, None
    if not stat.S_ISREG(st.st_mode):
        return st, file_kind(st.st_mode)
    return st, None


def _fixed_folder(pattern: str) -> str:
    """The folder a glob names before its first wildcard (its user chose it, symlinks and all)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    return str(Path(*parts[: min(fixed, len(parts) - 1)])) if len(parts) > 1 else "."


def _through_symlink(path: str, base: str, links: dict[str, bool]) -> bool:
    """Whether a folder between `base` and the file at `path` is a symlink (`**` and `*/`
    follow them); `links` remembers each folder's answer for the rest of the scan."""
    folder = os.path.dirname(path)
    rel = os.path.relpath(folder, base)
    if rel == "." or rel.startswith(".."):
        return False
    current = base
    for part in rel.split(os.sep):
        current = os.path.join(current, part)
        if current not in links:
            links[current] = os.path.islink(current)
        if links[current]:
            return True
    return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def excluded(path: str, patterns: Sequence[str]) -> bool:
    """An exclude glob with a folder matches the whole path; one without ('*.gz') the name."""
    name = os.path.basename(path)
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)


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
    """Runs discovery for every source: inotify hints plus rescans, or polling."""

    def __init__(self, sources: Sequence[SourceConfig], tailers: TailerSet, scan_interval: float,
                 poll_interval: float, state_dir: Path | None = None) -> None:
        self.sources = list(sources)
        self.state_dir = state_dir
        """The agent's own files: never followed, whatever the globs say."""
        self.tailers = tailers
        self.scan_interval = scan_interval
        self.poll_interval = poll_interval
        self.polled = {s.name for s in sources if s.watch == "poll"}
        self._observer: BaseObserver | None = None
        self._watched: dict[str, bool] = {}
        self._rescan = asyncio.Event()
        self._handler: _Hints | None = None

    @property
    def mode(self) -> str:
        return "polling" if len(self.polled) == len(self.sources) else (
            "inotify" if not self.polled else "inotify+polling")

    async def start(self) -> None:
        """Set up the watches and run the first scan, so that the files there at start are
        known when startup completes."""
        self._handler = _Hints(asyncio.get_running_loop(), self._changed)
        await asyncio.to_thread(self._watch, self._handler)
        await self._scan(self.sources)

    async def run(self) -> None:
        next_full = time.monotonic() + self.scan_interval
        try:
            while True:
                now = time.monotonic()
                if self._rescan.is_set() or now >= next_full:
                    self._rescan.clear()
                    await asyncio.to_thread(self._watch, self._handler)
                    await self._scan(self.sources)
                    next_full = now + self.scan_interval
                elif self.polled:
                    await self._scan([s for s in self.sources if s.name in self.polled])
                wait = next_full - time.monotonic()
                if self.polled:
                    wait = min(wait, self.poll_interval)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._rescan.wait()
        finally:
            await asyncio.to_thread(self._stop_observer)

    async def _scan(self, sources: Sequence[SourceConfig]) -> None:
        found, skipped = await asyncio.to_thread(scan, sources, self.state_dir)
        self.tailers.reconcile(found, [s.name for s in sources], skipped)

    def _changed(self, paths: set[str]) -> None:
        for path in paths:
            self.tailers.hint(path)
        if any(fnmatch.fnmatchcase(path, pattern) for path in paths
               for s in self.sources if s.name not in self.polled for pattern in s.paths):
            self._rescan.set()

    def _watch(self, handler: _Hints | None) -> None:
        """Add inotify watches for the folders that exist now; poll the sources we cannot watch."""
        watched = [s for s in self.sources if s.name not in self.polled]
        if not watched or handler is None:
            return
        try:
            if self._observer is None:
                self._observer = Observer()
                self._observer.start()
            for root, recursive in watch_roots(p for s in watched for p in s.paths).items():
                if root not in self._watched or (recursive and not self._watched[root]):
                    self._observer.schedule(handler, root, recursive=recursive)
                    self._watched[root] = recursive
        except (OSError, RecursionError) as exc:
            # RecursionError: watchdog adds a recursive watch folder by folder with a
            # recursive os.walk, which a tree about 1,000 folders deep exhausts.
            self._stop_observer()
            self.polled.update(s.name for s in watched)
            forced = [s.name for s in watched if s.watch == "inotify"]
            (log.error if forced else log.warning)(
                "inotify_unavailable", error=str(exc), sources=[s.name for s in watched],
                mode="polling", poll_interval=self.poll_interval,
                action="raise fs.inotify.max_user_watches and max_user_instances (sysctl) and "
                "restart the agent to use inotify again" if isinstance(exc, OSError) else
                "the folder tree under a `**` is too deep to watch; narrow the globs and "
                "restart the agent to use inotify again")

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
