"""Records passed between pipeline stages, and the small protocols that connect them.

Every record is frozen and slotted: a stage hands a record on and never sees it
change. Offsets are byte offsets into the file the record came from.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class RawLine:
    """One line as framed from a file: its bytes without the line ending.

    `offset` is where the line starts, `end` where the next one starts. A line
    longer than the limit keeps only its first bytes and has `truncated` set;
    `end` still points past its real end, so offsets stay in step with the file.
    """

    offset: int
    end: int
    data: bytes
    truncated: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.offset < self.end:
            raise ValueError(f"invalid line span {self.offset}..{self.end}")


@dataclass(frozen=True, slots=True)
class Document:
    """A JSON document ready for `_bulk_docs`, and the file position it stands for.

    `body` is the encoded JSON object (with its `_id`), so that batching, the
    spool and the HTTP request never encode a document twice.
    """

    doc_id: str
    body: bytes
    file: SourceFile
    end: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The shipper's word that the line ending at `end` in `file` is safe."""

    file: SourceFile
    end: int


Acknowledge = Callable[[Sequence[Ack]], None]
"""Where the shipper sends acknowledgements (the offset store)."""

LineSink = Callable[[SourceFile, str, Sequence[RawLine], str], Awaitable[None]]
"""What a tailer hands its lines to: (file, path, lines in file order, marker of the last
line's end)."""
