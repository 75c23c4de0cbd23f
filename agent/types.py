"""Records passed between pipeline stages, and the small protocols that connect them.

Every record is immutable: a stage hands a record on and never sees it change.
The per-line records (`RawLine`, `Document`, `Ack`) are named tuples, not frozen
dataclasses: a million of them are made for a million lines, and a frozen
dataclass costs three times as much to build. Offsets are byte offsets into the
file the record came from.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class FileId:
    """A file's identity: device, inode and a fingerprint of its first line.

    The fingerprint tells a reused inode from the file that had it before; it
    covers the first line (at most `identity.FINGERPRINT_BYTES`), which never
    changes once written in an append-only file. `generation` counts the times
    a file was found rewritten from its start with the same first line
    (copy-truncate of a log that starts with a fixed banner), so that the new
    content never reuses the old content's document ids.
    """

    dev: int
    ino: int
    fingerprint: str
    generation: int = 0

    def __post_init__(self) -> None:
        if self.dev < 0 or self.ino < 0 or not self.fingerprint or self.generation < 0:
            raise ValueError(f"invalid FileId {self.dev}/{self.ino}/{self.fingerprint!r}")

    def __str__(self) -> str:
        text = f"{self.dev:x}.{self.ino:x}.{self.fingerprint}"
        return f"{text}.{self.generation}" if self.generation else text

    @classmethod
    def parse(cls, text: str) -> FileId:
        dev, ino, fingerprint, *generation = text.split(".")
        if len(generation) > 1:
            raise ValueError(f"invalid file id {text!r}")
        return cls(int(dev, 16), int(ino, 16), fingerprint, int(generation[0]) if generation else 0)

    def same_file(self, other: FileId) -> bool:
        """The same inode with the same first line, whatever the generation."""
        return (self.dev, self.ino, self.fingerprint) == (other.dev, other.ino, other.fingerprint)

    def next_generation(self) -> FileId:
        return FileId(self.dev, self.ino, self.fingerprint, self.generation + 1)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file as read by one source: what offsets are kept for. Two sources may follow the
    same file (with different filters); each has its own offsets and document ids."""

    source: str
    file_id: FileId

    def __str__(self) -> str:
        return f"{self.source}/{self.file_id}"

    @classmethod
    def parse(cls, text: str) -> SourceFile:
        source, _, file_id = text.partition("/")
        return cls(source, FileId.parse(file_id))


class Checkpoint(NamedTuple):
    """A point to resume reading a file from: `offset`, and `marker`, the hash of the bytes just
    before `marker_offset` (<= `offset`; None when there are none to check, at the start).

    The marker may lag behind the offset: it is the last read position whose bytes the tailer
    reported and whose lines are all acknowledged. A named tuple, as the offsets file stores it
    as a plain list."""

    offset: int
    marker_offset: int
    marker: str | None

    @classmethod
    def at(cls, offset: int, marker: str | None) -> Checkpoint:
        """A checkpoint whose marker is that of its own offset."""
        return cls(offset, offset, marker)

    def check(self) -> Checkpoint:
        """This checkpoint, if it is one (as read from a file); ValueError otherwise."""
        if not (isinstance(self.marker, str | None) and 0 <= self.marker_offset <= self.offset):
            raise ValueError(f"invalid checkpoint {tuple(self)!r}")
        return self


FILE_START = Checkpoint(0, 0, None)
"""The start of a file: nothing read, nothing to check."""


class RawLine(NamedTuple):
    """One line as framed from a file: its bytes without the line ending.

    `offset` is where the line starts, `end` where the next one starts. A line
    longer than the limit keeps only its first bytes and has `truncated` set;
    `end` still points past its real end, so offsets stay in step with the file.
    """

    offset: int
    end: int
    data: bytes
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Lines:
    """Lines framed from one read of one file, in file order, as parallel lists.

    A chunk of 256 KiB holds thousands of lines, and most of the agent's time
    went into making a `RawLine` for each; here they are one list each of
    bytes, start and end offsets (built by C code: split, accumulate), and a
    `RawLine` is made only for whoever asks for one (`lines[i]`, iteration).
    `truncated` holds the indexes of lines cut at the size limit.
    """

    data: list[bytes]
    offsets: list[int]
    ends: list[int]
    truncated: frozenset[int] = frozenset()

    @classmethod
    def of(cls, lines: Sequence[RawLine]) -> Lines:
        return cls([line.data for line in lines], [line.offset for line in lines],
                   [line.end for line in lines], frozenset(i for i, line in enumerate(lines)
                                                           if line.truncated))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> RawLine:
        i = range(len(self.data))[index]
        return RawLine(self.offsets[i], self.ends[i], self.data[i], i in self.truncated)

    def __iter__(self) -> Iterator[RawLine]:
        truncated = self.truncated
        for i, (offset, end, data) in enumerate(zip(self.offsets, self.ends, self.data, strict=True)):
            yield RawLine(offset, end, data, i in truncated)


class Document(NamedTuple):
    """A JSON document ready for `_bulk_docs`, and the file position it stands for.

    `body` is the encoded JSON object (with its `_id`), so that batching, the
    spool and the HTTP request never encode a document twice.
    """

    doc_id: str
    body: bytes
    file: SourceFile
    end: int


class Ack(NamedTuple):
    """The shipper's word that the line ending at `end` in `file` is safe. A `Document` says
    the same of itself, so the shipper acknowledges documents without making `Ack`s."""

    file: SourceFile
    end: int


Acknowledge = Callable[[Sequence[Ack | Document]], None]
"""Where the shipper sends acknowledgements (the offset store)."""

LineSink = Callable[[SourceFile, str, Lines, str], Awaitable[None]]
"""What a tailer hands its lines to: (file, path, lines in file order, marker of the last
line's end)."""
