"""Per-source parsing: `Lines` in, `Document`s out, with a deterministic `_id`.

A `SourceParser` is built once per source from its config: the schema or
regex is already compiled, the filters and static fields are ready. On the
per-line path it only runs. Every line read is counted in exactly one
outcome: matched, unmatched (shipped raw with a `parse_error` marker, or
dropped when the source says so), filtered, or empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from agent.config import SourceConfig
from agent.counters import SourceCounters
from agent.patterns import LiteralPattern, Pattern
from agent.types import Document, FileId, Lines, SourceFile

RENAME_PREFIX = "x"
"""Prefix given to a field whose name CouchDB reserves (`_id` → `x_id`) or that
clashes with the metadata key; see `renamer` for why nothing collides."""

ERROR_TEXT_CHARS = 300
"""An unexpected error's text in `parse_error` is cut to this many characters."""

JSON_NESTING_CHECK = 200
"""A JSON line with more brackets than this may nest deeper than orjson can encode (254 levels;
it decodes 1,024), so it is test-encoded before it is accepted."""


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
        self._rename = renamer(source.metadata_key)
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
            try:
                if not checked and not self._kept(text):
                    counters.filtered += 1
                    continue
                fields, error = extract(text)
            except Exception as exc:
                # Bad input is data, never a crash (design.md 6): a pattern over its time limit,
                # or anything unforeseen, and this line ships raw.
                fields, error = {}, _failure("cannot parse this line", exc)
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
            try:
                encoded = dumps(fields)
            except Exception as exc:
                # JSON nested past orjson's limit, say: one line must never stop the agent.
                raw, error = self._unencodable(lines.data[i], exc, error)
                if raw is None:
                    continue
                raw["_id"] = doc_id
                encoded = dumps(raw)
            cut = i in truncated
            tail = b"}}" if error is None and not cut else _meta_notes(error, cut)
            # Slicing copies orjson's output to its size: orjson returns its whole buffer
            # (4 KiB for a 300-byte document), and a full queue would hold ten times its cap.
            body = b"%b%b%d%b" % (encoded[:-1], meta_head, offset, tail)
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

    def _unencodable(self, data: bytes, exc: Exception,
                     error: str | None) -> tuple[dict[str, Any] | None, str]:
        """The raw document for a line whose fields cannot be encoded (or None if unmatched lines
        are dropped), with its line recounted from matched to unmatched."""
        if error is None:
            self.counters.matched -= 1
            self.counters.unmatched += 1
        reason = _failure("cannot encode this line's fields", exc)
        if self.source.on_parse_error == "drop":
            self.counters.dropped_unmatched += 1
            return None, reason
        text = data.decode(self._encoding, errors="replace")
        return {self._message_key: text, **self._static}, reason

    def _kept(self, text: str) -> bool:
        """Every include matches and no exclude does (plain loops: this runs for every line)."""
        for pattern in self._include:
            if pattern.search(text) is None:
                return False
        for pattern in self._exclude:  # noqa: SIM110 - a loop, not all(genexpr): per-line cost
            if pattern.search(text) is not None:
                return False
        return True


def renamer(meta_key: str) -> Callable[[str], str]:
    """The renaming of field names, the same for JSON keys, regex groups and schema names.

    A name CouchDB reserves (leading `_`) or the metadata key, preceded by any number of
    `x`s (`_id`, `x_id`, `xx_id`, `agent`, `xagent`), gets one more `x`; every other name is
    kept. It cannot merge two fields: it is one-to-one (adding a prefix is), and it maps
    those names among themselves and every other name to itself. No result starts with `_`
    or is the metadata key."""
    prefix, skip = RENAME_PREFIX, len(RENAME_PREFIX)

    def moved(name: str) -> bool:
        while not (name.startswith("_") or name == meta_key):
            if not name.startswith(prefix):
                return False
            name = name[skip:]
        return True

    def rename(name: str) -> str:
        return prefix + name if moved(name) else name

    return rename


def _failure(what: str, exc: Exception) -> str:
    return f"{what}: {type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]


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

    def literal(pattern: Pattern) -> bytes | None:
        if not isinstance(pattern, LiteralPattern) or not pattern.pattern:
            return None
        try:
            return pattern.pattern.encode(source.encoding)
        except UnicodeEncodeError:
            return None

    include = [literal(p) for p in source.include]
    exclude = [literal(p) for p in source.exclude]
    return (tuple(w for w in include if w is not None), tuple(w for w in exclude if w is not None),
            None not in include and None not in exclude)


def _extractor(source: SourceConfig, rename: Callable[[str], str]) -> Extractor:
    """Choose the extraction function once, at construction, as structlog's processors do."""
    if source.format == "json":
        return _json_fields(rename, source.metadata_key)
    assert source.pattern is not None, "config validation guarantees a compiled pattern"
    return _pattern_fields(source.pattern, source.format == "schema", rename)


def _pattern_fields(pattern: Pattern, schema: bool,
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


def _json_fields(rename: Callable[[str], str], meta_key: str) -> Extractor:
    risky = ("_", RENAME_PREFIX, meta_key)

    def extract(text: str) -> tuple[dict[str, Any], str | None]:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return {}, f"invalid JSON: {exc}"
        if not isinstance(value, dict):
            return {}, f"expected a JSON object, got {type(value).__name__}"
        if len(text) > JSON_NESTING_CHECK and text.count("{") + text.count("[") > JSON_NESTING_CHECK:
            try:
                orjson.dumps(value)
            except TypeError as exc:
                return {}, f"JSON that cannot be stored: {exc}"
        for key in value:
            # One C call per key; `rename` only runs for a name that may be moved.
            if key.startswith(risky) and rename(key) != key:
                return {rename(k): v for k, v in value.items()}, None
        return value, None

    return extract
