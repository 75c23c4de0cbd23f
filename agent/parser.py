"""Per-source parsing: `RawLine`s in, `Document`s out, with a deterministic `_id`.

A `SourceParser` is built once per source from its config: the schema or
regex is already compiled, the filters and static fields are ready. On the
per-line path it only runs. Every line read is counted in exactly one
outcome: matched, unmatched (shipped raw with a `parse_error` marker, or
dropped when the source says so), filtered, or empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from agent.config import SourceConfig
from agent.counters import SourceCounters
from agent.types import Document, FileId, RawLine, SourceFile

RENAME_PREFIX = "x"
"""Prefix given to a field whose name CouchDB reserves (`_id` → `x_id`) or that
clashes with the metadata key."""


def document_id(source: str, file_id: FileId, offset: int) -> str:
    """Sortable and deterministic: one file's documents sort by offset, and a
    re-read line gets the same `_id`, which CouchDB answers with `conflict`."""
    return f"{source}:{file_id}:{offset:012x}"


@dataclass(frozen=True, slots=True)
class Parsed:
    """A kept line's top-level fields; `error` says why it did not parse, if it did not."""

    fields: dict[str, Any]
    error: str | None


@dataclass(frozen=True, slots=True)
class LineContext:
    """What the parser needs to know about where a batch of lines came from."""

    file: SourceFile
    path: str
    read_at: str


class SourceParser:
    """The compiled chain for one source: decode, filter, parse, add fields, encode."""

    def __init__(self, source: SourceConfig, host: str, counters: SourceCounters) -> None:
        self.source = source
        self.host = host
        self.counters = counters
        self._include = source.include
        self._exclude = source.exclude
        self._static = dict(source.fields)
        self._meta_key = source.metadata_key
        self._encoding = source.encoding
        self._extract = _extractor(source)

    def parse(self, line: RawLine) -> Parsed | None:
        """Parse one line into its top-level fields, or None if it is not to be shipped."""
        counters = self.counters
        counters.lines += 1
        text = self._decode(line.data)
        if line.offset == 0 and text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            counters.empty += 1
            return None
        if any(p.search(text) is None for p in self._include) or any(
            p.search(text) is not None for p in self._exclude
        ):
            counters.filtered += 1
            return None
        fields, error = self._extract(text)
        if error is None:
            counters.matched += 1
        else:
            counters.unmatched += 1
            if self.source.on_parse_error == "drop":
                counters.dropped_unmatched += 1
                return None
            fields = {"message": text}
        fields = self._clean(fields)
        fields.update(self._static)
        if line.truncated:
            counters.truncated += 1
        return Parsed(fields, error)

    def documents(self, lines: Sequence[RawLine], context: LineContext) -> list[Document]:
        """Turn the kept lines of a batch into documents ready to ship."""
        docs = []
        for line in lines:
            parsed = self.parse(line)
            if parsed is not None:
                docs.append(self.document(line, parsed, context))
        return docs

    def document(self, line: RawLine, parsed: Parsed, context: LineContext) -> Document:
        doc_id = document_id(self.source.name, context.file.file_id, line.offset)
        meta: dict[str, Any] = {
            "source": self.source.name,
            "host": self.host,
            "path": context.path,
            "file": str(context.file.file_id),
            "offset": line.offset,
            "read_at": context.read_at,
        }
        if parsed.error is not None:
            meta["parse_error"] = parsed.error
        if line.truncated:
            meta["truncated"] = True
        body = {"_id": doc_id, **parsed.fields, self._meta_key: meta}
        # orjson returns its whole output buffer (4 KiB for a 300-byte document): copy it to its
        # size, or a full queue holds ten times the memory its byte cap says.
        return Document(doc_id, bytes(memoryview(orjson.dumps(body))), context.file, line.end)

    def _decode(self, data: bytes) -> str:
        try:
            text = data.decode(self._encoding)
        except UnicodeDecodeError:
            self.counters.invalid_encoding += 1
            text = data.decode(self._encoding, errors="replace")
        if "\x00" in text:
            self.counters.nul_bytes += 1
        return text

    def _clean(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Rename the field names CouchDB reserves, and the metadata key."""
        if not any(k.startswith("_") or k == self._meta_key for k in fields):
            return fields
        return {
            (RENAME_PREFIX + k if k.startswith("_") or k == self._meta_key else k): v
            for k, v in fields.items()
        }


Extractor = Callable[[str], tuple[dict[str, Any], str | None]]


def _extractor(source: SourceConfig) -> Extractor:
    """Choose the extraction function once, at construction, as structlog's processors do."""
    if source.format == "json":
        return _json_fields
    assert source.pattern is not None, "config validation guarantees a compiled pattern"
    return _pattern_fields(source.pattern, anchored=source.format == "schema")


def _pattern_fields(pattern: re.Pattern[str], anchored: bool) -> Extractor:
    find = pattern.match if anchored else pattern.search
    kind = "schema" if anchored else "regex"

    def extract(text: str) -> tuple[dict[str, Any], str | None]:
        match = find(text)
        if match is None:
            return {}, f"line does not match the {kind}"
        return {k: v for k, v in match.groupdict().items() if v is not None}, None

    return extract


def _json_fields(text: str) -> tuple[dict[str, Any], str | None]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return {}, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return {}, f"expected a JSON object, got {type(value).__name__}"
    return value, None
