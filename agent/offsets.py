"""Committed read offsets: the contiguous-acknowledgement rule, and the atomic state file.

`OffsetStore` is pure bookkeeping. For each file it remembers, in file
order, the end offsets of the documents handed to the shipper, and moves
the committed offset only to the end of the longest run, from the start,
whose documents are all acknowledged (the rule Vector's OrderedFinalizer
gives). Lines that produce no document (filtered, empty) count as
acknowledged as soon as they are read.

`StateFile` persists the committed offsets: temp file, fsync, rename, fsync
of the folder. A state file that cannot be read is moved aside and
reported; the agent then starts from the beginning of each file, which
re-sends documents CouchDB already has and answers with `conflict`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent.types import Ack, FileId

STATE_VERSION = 1
log = structlog.get_logger("agent.offsets")


@dataclass(slots=True)
class FileProgress:
    """One file's committed offset and its documents still waiting for an ack."""

    path: str
    committed: int
    updated: float
    pending: deque[int] = field(default_factory=deque)
    acked: set[int] = field(default_factory=set)
    live: bool = False


class OffsetStore:
    def __init__(self, entries: dict[FileId, FileProgress] | None = None) -> None:
        self.files: dict[FileId, FileProgress] = entries or {}
        self.dirty = False

    def resume_offset(self, file_id: FileId) -> int | None:
        """Where to resume reading `file_id`, or None if it was never read."""
        progress = self.files.get(file_id)
        return None if progress is None else progress.committed

    def attach(self, file_id: FileId, path: str, offset: int) -> None:
        """A tailer starts reading `file_id` at `offset` (its committed offset, or 0 for a new file)."""
        progress = self.files.get(file_id)
        if progress is None or progress.committed != offset:
            self.dirty = True
        self.files[file_id] = FileProgress(path, offset, time.time(), live=True)

    def detach(self, file_id: FileId) -> None:
        """The tailer let go of the file; its entry stays until `prune`."""
        progress = self.files.get(file_id)
        if progress is not None:
            progress.live = False

    def expect(self, file_id: FileId, doc_ends: Sequence[int], read_to: int) -> None:
        """Documents ending at `doc_ends` were queued; every line up to `read_to` was read."""
        progress = self.files[file_id]
        progress.pending.extend(doc_ends)
        last = progress.pending[-1] if progress.pending else progress.committed
        if read_to > last:
            progress.pending.append(read_to)
            progress.acked.add(read_to)
        self._advance(progress)

    def acknowledge(self, acks: Iterable[Ack]) -> None:
        touched = []
        for ack in acks:
            progress = self.files.get(ack.file_id)
            if progress is not None:
                progress.acked.add(ack.end)
                touched.append(progress)
        for progress in touched:
            self._advance(progress)

    def outstanding(self) -> int:
        """Documents queued but not yet acknowledged, over all files."""
        return sum(len(p.pending) - len(p.acked) for p in self.files.values())

    def prune(self, older_than: float) -> list[FileId]:
        """Forget files no tailer follows that have not been seen since `older_than`."""
        gone = [fid for fid, p in self.files.items() if not p.live and p.updated < older_than]
        for fid in gone:
            del self.files[fid]
        if gone:
            self.dirty = True
        return gone

    def _advance(self, progress: FileProgress) -> None:
        pending, acked = progress.pending, progress.acked
        moved = False
        while pending and pending[0] in acked:
            end = pending.popleft()
            acked.discard(end)
            progress.committed = end
            moved = True
        if moved:
            progress.updated = time.time()
            self.dirty = True

    def snapshot(self) -> dict[str, Any]:
        """The persistent form, and a clean slate for `dirty`."""
        self.dirty = False
        return {
            "version": STATE_VERSION,
            "files": {
                str(fid): {"path": p.path, "offset": p.committed, "updated": round(p.updated, 3)}
                for fid, p in self.files.items()
            },
        }


class StateFile:
    """The offsets on disk, replaced atomically on every write."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "offsets.json"
        self._tmp = state_dir / "offsets.json.tmp"

    def load(self) -> dict[FileId, FileProgress]:
        """Read the committed offsets; a damaged file is moved aside and reported, never fatal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp_entries = self._read(self._tmp, quiet=True)
        if tmp_entries is not None:
            # A complete temp file means a write was fsynced but not yet renamed: it is newer.
            os.replace(self._tmp, self.path)
            return tmp_entries
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
        if not self.path.exists():
            return {}
        entries = self._read(self.path, quiet=False)
        if entries is None:
            aside = self.path.with_name(f"offsets.json.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("state_file_corrupt", path=str(self.path), moved_to=str(aside),
                      action="reading every file from its start; CouchDB answers documents "
                      "it already has with conflict, so nothing is doubled")
            return {}
        return entries

    def save(self, snapshot: dict[str, Any]) -> None:
        """Write `snapshot` durably: temp file, fsync, rename, fsync of the folder. Blocking."""
        data = orjson.dumps(snapshot)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read(self, path: Path, quiet: bool) -> dict[FileId, FileProgress] | None:
        try:
            raw = orjson.loads(path.read_bytes())
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {raw.get('version')!r}")
            return {
                FileId.parse(key): FileProgress(str(e["path"]), int(e["offset"]),
                                                float(e["updated"]))
                for key, e in raw["files"].items()
            }
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not quiet:
                log.error("state_file_unreadable", path=str(path), error=str(exc))
            return None
