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
    changes once written in an append-only file.
    """

    dev: int
    ino: int
    fingerprint: str

    def __post_init__(self) -> None:
        if self.dev < 0 or self.ino < 0 or not self.fingerprint:
            raise ValueError(f"invalid FileId {self.dev}/{self.ino}/{self.fingerprint!r}")

    def __str__(self) -> str:
        return f"{self.dev:x}.{self.ino:x}.{self.fingerprint}"

    @classmethod
    def parse(cls, text: str) -> FileId:
        dev, ino, fingerprint = text.split(".")
        return cls(int(dev, 16), int(ino, 16), fingerprint)


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
    file_id: FileId
    end: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The shipper's word that the line ending at `end` in `file_id` is safe."""

    file_id: FileId
    end: int


Acknowledge = Callable[[Sequence[Ack]], None]
"""Where the shipper sends acknowledgements (the offset store)."""

LineSink = Callable[[FileId, str, Sequence[RawLine]], Awaitable[None]]
"""What a tailer hands its lines to: (file, path, lines in file order)."""
