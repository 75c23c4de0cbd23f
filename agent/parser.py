"""Per-source parsing: `Lines` in, `Document`s out, with a deterministic `_id`.

A `SourceParser` is built once per source from its config: the schema or
regex is already compiled, the filters and static fields are ready. On the
per-line path it only runs. Every line read is counted in exactly one
outcome: matched, unmatched (shipped raw with a `parse_error` marker, or
dropped when the source says so), filtered, or empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from agent.config import SourceConfig
from agent.counters import SourceCounters
from agent.types import Document, FileId, Lines, SourceFile

RENAME_PREFIX = "x"
"""Prefix given to a field whose name CouchDB reserves (`_id` → `x_id`) or that
clashes with the metadata key."""


def id_prefix(source: str, file_id: FileId | str) -> str:
    """A document's `_id` is this prefix and its line's offset in 12 hex digits: sortable (one
    file's documents sort by offset) and deterministic (a re-read line gets the same `_id`,
    which CouchDB answers with `conflict`)."""
    return f"{source}:{file_id}:"


Kept = tuple[int, dict[str, Any], str | None]
"""A line to ship (its index in `Lines`), its top-level fields, and why it did not parse
(None if it did)."""

BYTE_FILTER_ENCODINGS = frozenset({"utf-8", "ascii", "iso8859-1", "iso8859-15", "cp1252"})
"""Encodings in which an ASCII line's bytes read as the same characters, so a literal filter
can be tried on the bytes before the line is decoded."""

REGEX_SYNTAX = frozenset(".^$*+?{}[]\\|()")


@dataclass(frozen=True, slots=True)
class LineContext:
    """What the parser needs to know about where a batch of lines came from."""

    file: SourceFile
    path: str
    read_at: str


class SourceParser:
    """The compiled chain for one source: decode, filter, parse, add fields, encode.

    The per-line work is one loop (`kept`) with everything it needs bound
    once: for most lines it runs a byte search, a decode and one regex match,
    and makes one dict. Plain-word filters (`include: [NOTICE]`) are tried on
    an ASCII line's bytes first, so a line that is dropped is never decoded.
    """

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
        self._byte_include, self._byte_exclude, self._all_literal = _byte_filters(source)

    def kept(self, lines: Lines) -> Iterator[Kept]:
        """The lines to ship with their fields; every line is counted in exactly one outcome."""
        counters = self.counters
        byte_include, byte_exclude = self._byte_include, self._byte_exclude
        byte_filtered = bool(byte_include or byte_exclude)
        only_bytes = self._all_literal
        static, extract, decode = self._static, self._extract, self._decode
        drop_unmatched = self.source.on_parse_error == "drop"
        truncated = lines.truncated
        for i, data in enumerate(lines.data):
            checked = False
            if byte_filtered and data.isascii():
                # Loops, not any(genexpr): a generator costs more than the search itself.
                dropped = False
                for word in byte_include:
                    if word not in data:
                        dropped = True
                        break
                for word in byte_exclude:
                    if word in data:
                        dropped = True
                        break
                if dropped:
                    counters.lines += 1
                    if not data.strip():
                        counters.empty += 1
                    else:
                        counters.filtered += 1
                        if b"\x00" in data:
                            counters.nul_bytes += 1
                    continue
                checked = only_bytes
            counters.lines += 1
            text = decode(data)
            if text.startswith("\ufeff") and lines.offsets[i] == 0:
                text = text[1:]
            if not text.strip():
                counters.empty += 1
                continue
            if not checked and not self._kept(text):
                counters.filtered += 1
                continue
            fields, error = extract(text)
            if error is None:
                counters.matched += 1
            else:
                counters.unmatched += 1
                if drop_unmatched:
                    counters.dropped_unmatched += 1
                    continue
                fields = {self._message_key: text}
            if static:
                fields.update(static)
            if truncated and i in truncated:
                counters.truncated += 1
            yield i, fields, error

    def documents(self, lines: Lines, context: LineContext) -> list[Document]:
        """Turn the kept lines of a batch into encoded documents ready to ship.

        The metadata differs between a batch's documents only in the offset, so it is
        encoded once per batch and each body is the fields' JSON with it spliced in."""
        file_text = str(context.file.file_id)
        prefix = id_prefix(self.source.name, file_text)
        meta = {"source": self.source.name, "host": self.host, "path": context.path,
                "file": file_text, "read_at": context.read_at}
        meta_head = (b"," + orjson.dumps(self._meta_key) + b":" + orjson.dumps(meta)[:-1]
                     + b',"offset":')
        file, dumps = context.file, orjson.dumps
        offsets, ends, truncated = lines.offsets, lines.ends, lines.truncated
        docs = []
        for i, fields, error in self.kept(lines):
            offset = offsets[i]
            doc_id = f"{prefix}{offset:012x}"
            fields["_id"] = doc_id
            cut = i in truncated
            tail = b"}}" if error is None and not cut else _meta_notes(error, cut)
            # Slicing copies orjson's output to its size: orjson returns its whole buffer
            # (4 KiB for a 300-byte document), and a full queue would hold ten times its cap.
            body = b"%b%b%d%b" % (dumps(fields)[:-1], meta_head, offset, tail)
            docs.append(Document(doc_id, body, file, ends[i]))
        return docs

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


def _meta_notes(error: str | None, truncated: bool) -> bytes:
    notes: dict[str, Any] = {}
    if error is not None:
        notes["parse_error"] = error
    if truncated:
        notes["truncated"] = True
    return b"," + orjson.dumps(notes)[1:] + b"}"


def _byte_filters(source: SourceConfig) -> tuple[tuple[bytes, ...], tuple[bytes, ...], bool]:
    """The include and exclude patterns that are plain words, as bytes in the source's encoding,
    and whether every pattern is one. Empty when the encoding does not allow it."""
    if source.encoding not in BYTE_FILTER_ENCODINGS:
        return (), (), False

    def literal(pattern: re.Pattern[str]) -> bytes | None:
        text = pattern.pattern
        if pattern.flags & ~re.UNICODE or REGEX_SYNTAX.intersection(text) or not text:
            return None
        try:
            return text.encode(source.encoding)
        except UnicodeEncodeError:
            return None

    include = [literal(p) for p in source.include]
    exclude = [literal(p) for p in source.exclude]
    return (tuple(w for w in include if w is not None), tuple(w for w in exclude if w is not None),
            None not in include and None not in exclude)


def _extractor(source: SourceConfig, rename: Callable[[str], str]) -> Extractor:
    """Choose the extraction function once, at construction, as structlog's processors do."""
    if source.format == "json":
        return _json_fields(rename)
    assert source.pattern is not None, "config validation guarantees a compiled pattern"
    return _pattern_fields(source.pattern, source.format == "schema", rename)


def _pattern_fields(pattern: re.Pattern[str], schema: bool,
                    rename: Callable[[str], str]) -> Extractor:
    find = pattern.match if schema else pattern.search
    error = f"line does not match the {'schema' if schema else 'regex'}"
    names = {name: rename(name) for name in pattern.groupindex}
    renamed = any(name != new for name, new in names.items())
    # A schema's captures all take part in every match; a regex's may not (`(?P<a>x)?`), and
    # those are left out. Looking for None costs a comparison per field, so only regexes do.
    may_miss = not schema

    def extract(text: str) -> tuple[dict[str, Any], str | None]:
        match = find(text)
        if match is None:
            return {}, error
        fields = match.groupdict()
        if renamed:
            return {names[k]: v for k, v in fields.items() if v is not None}, None
        if may_miss and None in fields.values():
            return {k: v for k, v in fields.items() if v is not None}, None
        return fields, None

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
