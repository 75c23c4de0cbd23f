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


def document_id(source: str, file_id: FileId | str, offset: int) -> str:
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
        self._message_key = self._rename("message")
        self._extract = _extractor(source, self._rename)

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
        if not self._kept(text):
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
            fields = {self._message_key: text}
        fields.update(self._static)
        if line.truncated:
            counters.truncated += 1
        return Parsed(fields, error)

    def documents(self, lines: Sequence[RawLine], context: LineContext) -> list[Document]:
        """Turn the kept lines of a batch into documents ready to ship."""
        docs = []
        file_text = str(context.file.file_id)
        for line in lines:
            parsed = self.parse(line)
            if parsed is not None:
                docs.append(self.document(line, parsed, context, file_text))
        return docs

    def document(self, line: RawLine, parsed: Parsed, context: LineContext,
                 file_text: str | None = None) -> Document:
        file_text = file_text or str(context.file.file_id)
        doc_id = document_id(self.source.name, file_text, line.offset)
        meta: dict[str, Any] = {
            "source": self.source.name,
            "host": self.host,
            "path": context.path,
            "file": file_text,
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

    def _kept(self, text: str) -> bool:
        """Every include matches and no exclude does (plain loops: this runs for every line)."""
        for pattern in self._include:
            if pattern.search(text) is None:
                return False
        for pattern in self._exclude:  # noqa: SIM110 - a loop, not all(genexpr): per-line cost
            if pattern.search(text) is not None:
                return False
        return True

    def _rename(self, name: str) -> str:
        """A name CouchDB reserves (leading `_`), or the metadata key, gets a prefix."""
        return RENAME_PREFIX + name if name.startswith("_") or name == self._meta_key else name


Extractor = Callable[[str], tuple[dict[str, Any], str | None]]


def _extractor(source: SourceConfig, rename: Callable[[str], str]) -> Extractor:
    """Choose the extraction function once, at construction, as structlog's processors do."""
    if source.format == "json":
        return _json_fields(rename)
    assert source.pattern is not None, "config validation guarantees a compiled pattern"
    return _pattern_fields(source.pattern, source.format == "schema", rename)


def _pattern_fields(pattern: re.Pattern[str], anchored: bool,
                    rename: Callable[[str], str]) -> Extractor:
    find = pattern.match if anchored else pattern.search
    error = f"line does not match the {'schema' if anchored else 'regex'}"
    names = {name: rename(name) for name in pattern.groupindex}
    renamed = any(name != new for name, new in names.items())

    def extract(text: str) -> tuple[dict[str, Any], str | None]:
        match = find(text)
        if match is None:
            return {}, error
        if renamed:
            return {names[k]: v for k, v in match.groupdict().items() if v is not None}, None
        return {k: v for k, v in match.groupdict().items() if v is not None}, None

    return extract


def _json_fields(rename: Callable[[str], str]) -> Extractor:
    def extract(text: str) -> tuple[dict[str, Any], str | None]:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return {}, f"invalid JSON: {exc}"
        if not isinstance(value, dict):
            return {}, f"expected a JSON object, got {type(value).__name__}"
        if any(rename(k) != k for k in value):
            value = {rename(k): v for k, v in value.items()}
        return value, None

    return extract
