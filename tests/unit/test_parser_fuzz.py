"""Fuzzing every parser: whatever the bytes, each line becomes exactly one valid document or is
counted as dropped, and nothing raises.

Inputs mix random bytes with what broke or could break a parser: JSON nested past orjson's
encoding limit, huge numbers, invalid UTF-8, NULs, CRLF, field names CouchDB reserves or that
collide once renamed. Bounded (`max_examples`) so the whole file runs in a few seconds in CI.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import _render
from agent.lines import LineSplitter
from agent.multiline import MultilineAssembler
from agent.parser import LineContext, SourceParser, id_prefix
from agent.types import Lines, SourceFile
from tests.unit.sources import FILE, make_parser

CONTEXT = LineContext(SourceFile("f", FILE), "/var/log/f.log", "2026-01-01T00:00:00.000+00:00")
MAX_LINE = 4096

KINDS: dict[str, dict[str, Any]] = {
    "schema": {"schema": r"$date $hour _ \[$process\] $a:$b $rest..."},
    "schema-re2": {"schema": r"$u@$h:$p] $_id $agent"},
    "regex": {"regex": r"(?P<_id>\S+) (?<agent>\S*)(?: (?P<xagent>\d+))?", "exclude": [r"^(a+)+$"]},
    "regex-fallback": {"regex": r"^(?P<x>(a|aa)+)\1b", "include": [r"(?<!z)."]},
    "json": {"format": "json", "fields": {"machine": "m"}},
    "json-drop": {"format": "json", "on_parse_error": "drop", "include": ["[{]"]},
    "plain": {"schema": "$message...", "include": ["NOTICE"], "exclude": ["skip"]},
    "multiline": {"format": "json", "multiline": {"start": r"^\{"}},
    "multiline-schema": {"schema": "$level $rest...", "multiline": {"start": r"^(INFO|ERROR)\b"}},
}

NAMES = st.sampled_from(["_id", "x_id", "xx_id", "_rev", "_deleted", "_attachments", "agent",
                         "xagent", "message", "xmessage", "", "_", "x", "\u0000", "a\nb", "é"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**40), 10**40),
                    st.floats(allow_nan=False), st.text(max_size=20))


def deep(depth: int, opener: str) -> bytes:
    """An object holding `depth` nested arrays or objects (orjson encodes 254, decodes 1,024)."""
    inner = "[" * depth + "]" * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    return ('{"deep":' + inner + "}").encode()


JSON_LINES = st.one_of(
    st.dictionaries(NAMES, st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(NAMES, c, max_size=3), max_leaves=10),
                    max_size=6).map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    st.builds(deep, st.integers(200, 1100), st.sampled_from(["[", "{"])),
    st.integers(-(10**400), 10**400).map(lambda n: b'{"n": %d}' % n),
    st.sampled_from([b'{"n": 1e999}', b'{"s": "\\ud800"}', b'{"a": 1, "a": 2}', b"[]", b"null",
                     b'{"_id": "evil", "x_id": "kept?"}', b'{"agent": 1, "xagent": 2}']),
)
TEXT_LINES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b"NOTICE", b"INFO", b"ERROR", b"skip", b"a", b"b", b"@", b":", b"]",
                              b" ", b"\t", b"\r", b"\x00", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"{",
                              b"\xc2\xa0", b"aaaaaaaaaaaaaaaaaaaa"]), max_size=40).map(b"".join),
)
LINES = st.lists(st.one_of(JSON_LINES, TEXT_LINES), min_size=1, max_size=12)
ENDINGS = st.sampled_from([b"\n", b"\r\n"])


def framed(parser: SourceParser, blob: bytes) -> Lines:
    splitter = LineSplitter(MAX_LINE)
    lines = list(splitter.feed(blob))
    last = splitter.flush()
    if last is not None:
        lines.append(last)
    multiline = parser.source.multiline
    if multiline is None:
        return Lines.of(lines)
    assembler = MultilineAssembler(multiline.start, multiline.max_bytes)
    events = list(assembler.feed(Lines.of(lines)))
    pending = assembler.flush()
    return Lines.of([*events, *([pending] if pending is not None else [])])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_line_is_one_valid_document_or_a_counted_drop(kind: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
    @given(LINES, ENDINGS)
    def check(texts: list[bytes], ending: bytes) -> None:
        parser, counters = make_parser(name="f", **KINDS[kind])
        lines = framed(parser, b"".join(t.replace(b"\n", b" ") + ending for t in texts))
        docs = parser.documents(lines, CONTEXT)

        outcomes = counters.matched + counters.unmatched + counters.filtered + counters.empty
        assert counters.lines == len(lines) == outcomes
        assert len(docs) == counters.matched + counters.unmatched - counters.dropped_unmatched
        offsets = dict(zip(lines.offsets, lines.ends, strict=True))
        for doc in docs:
            body = orjson.loads(doc.body)
            orjson.dumps(body)
            offset = body[parser.source.metadata_key]["offset"]
            assert doc.doc_id == body["_id"] == f"{id_prefix('f', FILE)}{offset:012x}"
            assert doc.end == offsets[offset]
            assert [k for k in body if k.startswith("_")] == ["_id"]
        again = parser.documents(lines, CONTEXT)
        assert [d.doc_id for d in again] == [d.doc_id for d in docs]
        # `agent parse` prints the same lines through its own path.
        for printed in _render(make_parser(name="f", **KINDS[kind])[0], lines).splitlines():
            assert not any(k.startswith("_") for k in orjson.loads(printed))

    check()
