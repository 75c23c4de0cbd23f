"""Each parser (token schema, regex, JSON lines), filters, renaming, counting, and `_id`s."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agent.parser import LineContext, SourceParser, id_prefix
from agent.types import Lines, RawLine, SourceFile
from tests.unit.sources import FILE, make_parser


def parse(parser: SourceParser, text: bytes | str) -> dict[str, Any] | None:
    data = text.encode() if isinstance(text, str) else text
    kept = list(parser.kept(Lines.of([RawLine(0, len(data) + 1, data)])))
    if not kept:
        return None
    _, fields, error = kept[0]
    return {**fields, **({"!error": error} if error else {})}


def test_schema_with_static_fields() -> None:
    parser, _ = make_parser(schema=r"$date $hour _ _ _ \[$process\] _ $ip", fields={"machine": "server"})
    line = "2017-06-14 17:16:12,329 fail2ban.actions        [1112]: NOTICE  [sshd] Ban 59.45.175.88"
    assert parse(parser, line) == {"date": "2017-06-14", "hour": "17:16:12,329", "process": "sshd",
                                   "ip": "59.45.175.88", "machine": "server"}


def test_regex_accepts_both_named_group_spellings_and_searches() -> None:
    for pattern in (r"Ban (?P<ip>\S+)", r"Ban (?<ip>\S+)"):
        parser, _ = make_parser(regex=pattern)
        assert parse(parser, "x NOTICE Ban 1.2.3.4") == {"ip": "1.2.3.4"}


def test_regex_lookbehind_is_not_mistaken_for_a_named_group() -> None:
    parser, _ = make_parser(regex=r"(?<=Ban )(?<ip>\S+)(?<!x)")
    assert parse(parser, "Ban 1.2.3.4") == {"ip": "1.2.3.4"}


def test_regex_groups_that_did_not_take_part_are_left_out() -> None:
    parser, _ = make_parser(regex=r"(?P<a>a)?(?P<b>b)")
    assert parse(parser, "b") == {"b": "b"}


def test_json_lines_objects_only() -> None:
    parser, counters = make_parser(format="json")
    assert parse(parser, '{"a": 1, "b": {"c": [1, 2]}}') == {"a": 1, "b": {"c": [1, 2]}}
    assert parse(parser, "[1, 2]") == {"message": "[1, 2]", "!error": "expected a JSON object, got list"}
    bad = parse(parser, "not json")
    assert bad is not None and bad["!error"].startswith("invalid JSON")
    assert (counters.matched, counters.unmatched) == (1, 2)


def test_reserved_names_are_renamed_never_sent() -> None:
    parser, _ = make_parser(format="json")
    assert parse(parser, '{"_id": "x", "_rev": "1", "agent": "curl", "ok": 1}') == {
        "x_id": "x", "x_rev": "1", "xagent": "curl", "ok": 1}
    schema_parser, _ = make_parser(schema="$_id $b")
    assert parse(schema_parser, "1 2") == {"x_id": "1", "b": "2"}


def test_include_all_and_exclude_any() -> None:
    parser, counters = make_parser(schema="$msg...", include=["NOTICE", "Ban"], exclude=["127\\.0\\.0\\.1"])
    assert parse(parser, "NOTICE Ban 1.2.3.4") is not None
    assert parse(parser, "NOTICE Unban 1.2.3.4") is None
    assert parse(parser, "INFO Ban 1.2.3.4") is None
    assert parse(parser, "NOTICE Ban 127.0.0.1") is None
    assert counters.filtered == 3


def test_unmatched_lines_are_kept_raw_or_dropped_and_always_counted() -> None:
    parser, counters = make_parser(schema="$a Ban $ip", fields={"m": "s"})
    assert parse(parser, "garbage") == {"message": "garbage", "m": "s",
                                        "!error": "line does not match the schema"}
    dropper, dropped = make_parser(schema="$a Ban $ip", on_parse_error="drop")
    assert parse(dropper, "garbage") is None
    assert (counters.unmatched, dropped.unmatched, dropped.dropped_unmatched) == (1, 1, 1)


def test_empty_lines_are_counted_not_shipped() -> None:
    parser, counters = make_parser(schema="$a")
    assert parse(parser, "") is None
    assert parse(parser, "   ") is None
    assert counters.empty == 2 and counters.lines == 2


def test_invalid_encoding_and_nul_bytes_are_kept_and_counted() -> None:
    parser, counters = make_parser(schema="$month $rest...")
    assert parse(parser, b"D\xe9c 31 x\x00y") == {"month": "D\ufffdc", "rest": "31 x\x00y"}
    assert (counters.invalid_encoding, counters.nul_bytes) == (1, 1)


def test_document_has_deterministic_sortable_id_and_metadata() -> None:
    parser, counters = make_parser(schema="$a", metadata_key="meta")
    context = LineContext(SourceFile("t", FILE), "/var/log/x.log", "2026-01-01T00:00:00.000+00:00")
    lines = [RawLine(0, 4, b"abc"), RawLine(4, 5, b""), RawLine(5, 4000, b"long", truncated=True)]
    docs = parser.documents(Lines.of(lines), context)
    assert [d.end for d in docs] == [4, 4000]
    first, second = (orjson.loads(d.body) for d in docs)
    assert first["_id"] == "t:fe00.1234.ab12cd34ef56ab78:000000000000"
    assert first["meta"] == {"source": "t", "host": "host1", "path": "/var/log/x.log",
                             "file": str(FILE), "offset": 0, "read_at": context.read_at}
    assert second["meta"]["truncated"] is True and counters.truncated == 1
    assert docs[0].doc_id < docs[1].doc_id
    again = parser.documents(Lines.of(lines), context)
    assert [d.doc_id for d in again] == [d.doc_id for d in docs]


@pytest.mark.parametrize("offsets", [(9, 10), (255, 256), (4095, 65536)])
def test_ids_sort_like_offsets(offsets: tuple[int, int]) -> None:
    parser, _ = make_parser(schema="$a")
    context = LineContext(SourceFile("t", FILE), "/x", "2026-01-01T00:00:00.000+00:00")
    a, b = parser.documents(Lines.of([RawLine(o, o + 2, b"x") for o in offsets]), context)
    assert a.doc_id.startswith(id_prefix("t", FILE)) and a.doc_id < b.doc_id


LINES = [b"x NOTICE Ban 1.2.3.4", b"x NOTICE Unban 1.2.3.4", b"x INFO Ban 1.2.3.4", b"", b"   ",
         b"\t\x00 NOTICE Ban", b"\x00 INFO", "x NOTICE Bän 1".encode(), "x NOTICE Ban é".encode(),
         b"\xff NOTICE Ban", b"\xff INFO", "\u00a0".encode(), b"NOTICE Ban skip", b"\xef\xbb\xbfNOTICE Ban"]


@pytest.mark.parametrize("words", [
    {"include": ["NOTICE", "Ban"]}, {"exclude": ["skip", "INFO"]},
    {"include": ["Ban"], "exclude": ["skip"]}, {"include": ["Bän"]}, {"include": [" "]},
])
def test_filters_on_bytes_keep_and_count_exactly_what_regex_filters_do(words: dict[str, list[str]]) -> None:
    """Plain words are tried on the bytes first; the same words as regexes (which cannot be
    tried on bytes) must keep the same lines and count every line the same way."""
    as_regex = {key: [f"(?:{w})" for w in values] for key, values in words.items()}
    lines = []
    offset = 0
    for data in LINES:
        lines.append(RawLine(offset, offset + len(data) + 1, data))
        offset += len(data) + 1
    results = []
    for keys in (words, as_regex):
        parser, counters = make_parser(schema="_ $level $word...", **keys)
        kept = list(parser.kept(Lines.of(lines)))
        results.append((kept, counters.as_dict()))
    assert results[0] == results[1]
    assert results[0][1]["lines"] == len(LINES)
