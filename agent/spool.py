"""The disk spool of one database: append-only, checksummed segment files.

Documents go here when CouchDB cannot take them (unreachable, refusing,
or slower than the logs grow). A batch is appended and fsynced before its
lines count as acknowledged, so the log offsets may move past them. Once
CouchDB is back, the spool is replayed in order; a segment is deleted when
all of it is delivered.

A record is `MAGIC | length (u32) | crc32 (u32) | payload`, the payload being
`source/file-id <TAB> end-offset <LF>` followed by the document's JSON. A
torn record at the end of a segment (a crash during a write, before its
fsync, so its lines were never acknowledged) is dropped; a corrupt record
elsewhere is skipped by searching for the next MAGIC, and counted. The
owner of the spool learns of any damage (`damaged`), so that it can read
the lost lines again from the log files.

All methods block (file I/O and fsync): call them through a thread. They hold
one lock, so a thread left running by a cancelled `asyncio.to_thread` (an
append still writing at shutdown) finishes before another call touches the
segment, and `close` waits for it.

A spool folder that cannot be made or written (a read-only disk, a file in
its way) is never fatal: `append` raises `OSError`, which the shipper
treats as a full spool (reading pauses), and the next `append` tries again.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import structlog

from agent import durable
from agent.types import Document, SourceFile

MAGIC = b"\xc7CLs"
HEADER = struct.Struct("<4sII")
SUFFIX = ".seg"
READ_CHUNK = 64 * 1024
"""Bytes read from a segment at a time: a replay holds its batch and about one chunk, not the
segment (the oldest batch is read again at every probe while CouchDB is down)."""
DAMAGE_MARK = "damaged"
"""A file in the spool folder while lost records have not been read again from the logs."""
WhenFull = Literal["block", "drop_oldest"]
log = structlog.get_logger("agent.spool")


@dataclass(frozen=True, slots=True)
class SpooledDoc:
    """A document read back from the spool, and where it sits (for `commit`)."""

    doc: Document
    segment: int
    next_offset: int


@dataclass(slots=True)
class SpoolStats:
    records: int = 0
    """Records written and not yet delivered."""
    bytes: int = 0
    written: int = 0
    replayed: int = 0
    corrupt_records: int = 0
    torn_records: int = 0
    dropped_records: int = 0
    full: bool = False


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    records: int = 0
    read_offset: int = 0
    delivered: int = 0
    corrupt_at: set[int] = field(default_factory=set)


class Spool:
    def __init__(self, folder: Path, max_bytes: int, segment_bytes: int,
                 when_full: WhenFull = "block", read_chunk: int = READ_CHUNK) -> None:
        self.folder = folder
        self.read_chunk = read_chunk
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.when_full = when_full
        self.stats = SpoolStats()
        self.damaged = False
        """A record was lost to corruption, in this run or an earlier one whose damage was not
        yet handled (`clear_damage`): the mark is kept on disk, so a restart still knows."""
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._lock = threading.Lock()

    # -- opening

    def open(self) -> None:
        """Load the segments left by an earlier run, checking every record. A folder that cannot
        be made or listed is logged, not raised: `append` tries again (and fails while it lasts,
        which pauses reading). If it could not be listed, what it held is unknown: `damaged`."""
        with self._lock:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                names = [p.stem for p in self.folder.glob(f"*{SUFFIX}")]
            except OSError as exc:
                self.damaged = self.damaged or self.folder.exists()
                log.error("spool_unavailable", folder=str(self.folder), error=str(exc),
                          action="make it a writable folder; until then the spool counts as full "
                          "and reading pauses while CouchDB cannot take documents")
                return
            self._load(sorted(int(n) for n in names if n.isdigit()))
            if self.damaged or (self.folder / DAMAGE_MARK).exists():
                self._mark_damaged()

    def clear_damage(self) -> None:
        """The owner has read the lost lines again (or will from offsets already saved)."""
        with self._lock:
            self.damaged = False
            with contextlib.suppress(FileNotFoundError):
                (self.folder / DAMAGE_MARK).unlink()

    def _mark_damaged(self) -> None:
        if not self.damaged or not (self.folder / DAMAGE_MARK).exists():
            self.damaged = True
            try:
                (self.folder / DAMAGE_MARK).touch()
                durable.fsync_folder(self.folder)
            except OSError as exc:
                log.error("spool_damage_unmarked", folder=str(self.folder), error=str(exc),
                          action="a restart before the lost lines are read again will not know "
                          "of the loss; make the folder writable")

    def _load(self, numbers: list[int]) -> None:
        for number in numbers:
            segment = _Segment(number, self._path(number).stat().st_size)
            try:
                valid_end = self._check(segment)
            except OSError as exc:
                aside = self._path(number).with_suffix(".unreadable")
                log.error("spool_segment_unreadable", segment=str(self._path(number)),
                          error=str(exc), moved_to=str(aside),
                          action="its lines are read again from the log files if they still exist")
                self._mark_damaged()
                with contextlib.suppress(OSError):
                    self._path(number).rename(aside)
                continue
            if valid_end < segment.size:
                # A torn tail: those lines were never acknowledged, so they are read again.
                with open(self._path(number), "r+b") as f:
                    f.truncate(valid_end)
                segment.size = valid_end
            if segment.records == 0:
                self._path(number).unlink()
                continue
            self._segments.append(segment)
            self.stats.records += segment.records
            self.stats.bytes += segment.size
        if self._segments:
            log.info("spool_loaded", folder=str(self.folder), records=self.stats.records,
                     bytes=self.stats.bytes, corrupt=self.stats.corrupt_records,
                     torn=self.stats.torn_records)

    def _check(self, segment: _Segment) -> int:
        """Count the valid records of a segment; return where its valid data ends."""
        offset = valid_end = 0
        with _Window(self._path(segment.number), segment.size, self.read_chunk) as window:
            while offset < segment.size:
                record = window.record(offset)
                if record is None:
                    nxt = window.find_magic(offset + 1)
                    if nxt >= segment.size:
                        # Torn by a crash during a write (never acknowledged), or a damaged last
                        # record (acknowledged): the two cannot be told apart, so read again.
                        self.stats.torn_records += 1
                        self._mark_damaged()
                        return valid_end
                    segment.corrupt_at.add(offset)
                    self._corrupt(segment, offset)
                    offset = nxt
                    continue
                offset = valid_end = offset + HEADER.size + len(record)
                segment.records += 1
        return valid_end

    def _corrupt(self, segment: _Segment, offset: int) -> None:
        self.stats.corrupt_records += 1
        self._mark_damaged()
        log.error("spool_record_corrupt", segment=str(self._path(segment.number)), offset=offset,
                  action="skipped; its lines are read again from the log files if they still exist")

    # -- writing

    def append(self, docs: Sequence[Document]) -> bool:
        """Append and fsync `docs`; False (nothing written) if the spool is full. An OSError
        (no space left, an unwritable folder) also leaves nothing written."""
        with self._lock:
            return self._append(docs)

    def _append(self, docs: Sequence[Document]) -> bool:
        payloads = [_payload(d) for d in docs]
        size = sum(HEADER.size + len(p) for p in payloads)
        if not self._make_room(size):
            self.stats.full = True
            return False
        self.stats.full = False
        segment = self._active(size)
        assert self._fd is not None
        try:
            data = b"".join(HEADER.pack(MAGIC, len(p), zlib.crc32(p)) + p for p in payloads)
            durable.append(self._fd, data)
        except OSError:
            # Leave no partial record behind (the disk may be full): cut back and give up.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, segment.size)
            raise
        if segment.size == 0 and segment.records == 0:
            durable.fsync_folder(self.folder)
        segment.size += size
        segment.records += len(docs)
        self.stats.records += len(docs)
        self.stats.bytes += size
        self.stats.written += len(docs)
        return True

    def _make_room(self, size: int) -> bool:
        if self.stats.bytes + size <= self.max_bytes or self.stats.bytes == 0:
            return True
        if self.when_full == "block":
            return False
        while self._segments and self.stats.bytes + size > self.max_bytes:
            oldest = self._segments[0]
            dropped = oldest.records - oldest.delivered
            self._delete(oldest)
            self.stats.dropped_records += dropped
            log.warning("spool_dropped_oldest", records=dropped, policy="drop_oldest")
        return True

    def _active(self, incoming: int) -> _Segment:
        last = self._segments[-1] if self._segments else None
        if last is None or self._fd is None or last.size + incoming > self.segment_bytes:
            self._close_active()
            number = last.number + 1 if last else 1
            self.folder.mkdir(parents=True, exist_ok=True)
            # Opened before it is listed: a segment that could not be created must not be read.
            self._fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            last = _Segment(number, 0)
            self._segments.append(last)
        return last

    # -- replay

    @property
    def pending(self) -> int:
        return self.stats.records

    def read(self, max_docs: int, max_bytes: int) -> list[SpooledDoc]:
        """The next undelivered documents in order (the same ones again until `commit`)."""
        with self._lock:
            return self._read(max_docs, max_bytes)

    def _read(self, max_docs: int, max_bytes: int) -> list[SpooledDoc]:
        out: list[SpooledDoc] = []
        size = 0
        for segment in self._segments:
            if segment.read_offset >= segment.size:
                continue
            # Only a window from the read offset is read, and dropped once read: a spool waiting
            # for CouchDB holds none of its segment between probes.
            with _Window(self._path(segment.number), segment.size, self.read_chunk) as window:
                at = segment.read_offset
                while at < segment.size and len(out) < max_docs:
                    record = window.record(at)
                    if record is None:
                        if at not in segment.corrupt_at:
                            segment.corrupt_at.add(at)
                            self._corrupt(segment, at)
                        at = window.find_magic(at + 1)
                        if not out:
                            segment.read_offset = at  # nothing undelivered before it
                        continue
                    if out and size + len(record) > max_bytes:
                        return out
                    end = at + HEADER.size + len(record)
                    out.append(SpooledDoc(_document(record), segment.number, end))
                    size += len(record)
                    at = end
            if out:
                return out
        self._delete_finished()
        return out

    def commit(self, delivered: Sequence[SpooledDoc]) -> None:
        """`delivered` (as returned by `read`) reached CouchDB; delete finished segments."""
        with self._lock:
            self._commit(delivered)

    def _commit(self, delivered: Sequence[SpooledDoc]) -> None:
        for item in delivered:
            segment = self._segment(item.segment)
            if segment is None:
                continue
            segment.read_offset = max(segment.read_offset, item.next_offset)
            segment.delivered += 1
            self.stats.records -= 1
            self.stats.replayed += 1
        self._delete_finished()

    def _delete_finished(self) -> None:
        for segment in [s for s in self._segments if s.read_offset >= s.size]:
            self._delete(segment)

    def _segment(self, number: int) -> _Segment | None:
        return next((s for s in self._segments if s.number == number), None)

    def _delete(self, segment: _Segment) -> None:
        if segment is self._segments[-1]:
            self._close_active()
        self._segments.remove(segment)
        self.stats.bytes -= segment.size
        self.stats.records -= segment.records - segment.delivered
        with contextlib.suppress(FileNotFoundError):
            self._path(segment.number).unlink()

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the active segment, once any call still running in a thread has finished."""
        with self._lock:
            self._close_active()

    def _path(self, number: int) -> Path:
        return self.folder / f"{number:012d}{SUFFIX}"


def spool_folder(root: Path, database: str) -> Path:
    """The spool folder of `database`: percent-encoded, so that no two names share one (CouchDB
    allows `/` in names, and `app/x` and `app//x` are two databases)."""
    return root / quote(database, safe="")


def migrate_folders(root: Path, databases: Iterable[str]) -> None:
    """Move spools written under the old folder names (`root / database`, taken as a path) to
    their encoded names. An old folder that several databases map to is left alone and logged:
    which database its documents belong to cannot be told. Blocking."""
    claims: dict[Path, list[str]] = {}
    for database in databases:
        old = root / database
        if old != spool_folder(root, database):
            claims.setdefault(old, []).append(database)
    for old, names in claims.items():
        try:
            if not any(old.glob(f"*{SUFFIX}")):
                continue
            new = spool_folder(root, names[0])
            if len(names) > 1 or (new.exists() and any(new.glob(f"*{SUFFIX}"))):
                log.error("spool_migration_ambiguous", folder=str(old), databases=names,
                          action="move its segment files to the folder of the database they "
                          "belong to (names are percent-encoded now); they are not sent until then")
                continue
            new.mkdir(parents=True, exist_ok=True)
            for segment in sorted(old.glob(f"*{SUFFIX}")):
                segment.rename(new / segment.name)
            durable.fsync_folder(new)
            log.info("spool_migrated", database=names[0], old=str(old), new=str(new))
        except OSError as exc:
            log.error("spool_migration_failed", folder=str(old), error=str(exc),
                      action="move its segment files by hand to the percent-encoded folder name")


def _payload(doc: Document) -> bytes:
    return f"{doc.file}\t{doc.end}\t{doc.doc_id}\n".encode() + doc.body


def _document(payload: bytes) -> Document:
    head, _, body = payload.partition(b"\n")
    file, end, doc_id = head.decode().split("\t")
    return Document(doc_id, body, SourceFile.parse(file), int(end))


class _Window:
    """The bytes of one segment file (its first `size` bytes), read forward a chunk at a time:
    only the part from the last offset asked for on is kept, so a reader holds about one chunk
    (or one record, if larger) whatever the segment's size. Offsets only move forward."""

    def __init__(self, path: Path, size: int, chunk: int) -> None:
        self.path = path
        self.size = size
        self.chunk = chunk
        self._fd = -1
        self._start = 0
        self._data = b""

    def __enter__(self) -> _Window:
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
        self._data = b""

    def _get(self, at: int, n: int) -> bytes | None:
        """Bytes `at` to `at + n`, or None if the segment (or the file) ends before."""
        if at + n > self.size:
            return None
        end = self._start + len(self._data)
        if at < self._start or at + n > end:
            keep = self._data[at - self._start:] if self._start <= at < end else b""
            start = at + len(keep)
            want = min(max(n - len(keep), self.chunk), self.size - start)
            self._data = keep + os.pread(self._fd, want, start)
            self._start = at
            if at + n > self._start + len(self._data):
                return None  # the file is shorter than it was: read as the end
        return self._data[at - self._start:at - self._start + n]

    def record(self, at: int) -> bytes | None:
        """The payload of a valid record at `at`, or None (torn or damaged)."""
        header = self._get(at, HEADER.size)
        if header is None:
            return None
        magic, length, crc = HEADER.unpack(header)
        if magic != MAGIC:
            return None
        # A damaged length beyond the segment's end is refused before anything is read.
        payload = self._get(at + HEADER.size, length)
        if payload is None or zlib.crc32(payload) != crc:
            return None
        try:
            _document(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        return payload

    def find_magic(self, at: int) -> int:
        """The offset of the next MAGIC from `at` on, or the segment's size if there is none."""
        while at < self.size:
            span = self._get(at, min(self.chunk, self.size - at))
            if span is None:
                return self.size
            found = span.find(MAGIC)
            if found >= 0:
                return at + found
            if at + len(span) >= self.size:
                return self.size
            # The last bytes again: a MAGIC may straddle two spans.
            at += max(1, len(span) - len(MAGIC) + 1)
        return self.size
