"""The dead-letter file: documents CouchDB refused for good, kept with the reason.

A document lands here when CouchDB rejects it for itself (a per-document
`forbidden` or `unauthorized`, or a document too large or malformed to be
accepted alone). The record is fsynced before the document is acknowledged,
so a refused line is never lost: it moves from the log file to this file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from agent import durable
from agent.types import Document


@dataclass(frozen=True, slots=True)
class Rejection:
    doc: Document
    error: str
    reason: str


class DeadLetterFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "dead-letter.jsonl"
        self._lock = threading.Lock()
        """Shippers of several databases append from their own threads: one at a time, so that
        lines never interleave and a failed append cuts back only its own bytes."""

    def append(self, database: str, rejections: Sequence[Rejection]) -> None:
        """Append one JSON line per rejection and fsync; on OSError none is appended. Blocking."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = b"".join(
            b'{"at":%s,"database":%s,"error":%s,"reason":%s,"doc":%s}\n' % (
                orjson.dumps(at), orjson.dumps(database), orjson.dumps(r.error),
                orjson.dumps(r.reason), r.doc.body)
            for r in rejections
        )
        with self._lock:
            durable.append_file(self.path, lines)
