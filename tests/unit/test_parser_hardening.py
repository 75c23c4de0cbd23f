"""No pattern can stall the agent, no line can crash it, no field name can overwrite another.

The stall tests run patterns that take hours on a backtracking engine. They assert no time:
on a stalling implementation they never finish, and pytest-timeout fails them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.multiline import MultilineAssembler
from agent.parser import LineContext, SourceParser
from agent.patterns import LiteralPattern, compile_pattern
from agent.schema import compile_schema
from agent.types import Lines, RawLine, SourceFile
from tests.unit.sources import FILE, make_parser

CONTEXT = LineContext(SourceFile("t", FILE), "/var/log/x.log", "2026-01-01T00:00:00.000+00:00")
EVIL = "a" * 40 + "b"
"""`^(a+)+$` on this takes about 2^40 steps on a backtracking engine."""
BACKREF_EVIL = r"^(?P<x>(a|aa)+)\1b$"
"""Needs a backreference, so RE2 cannot run it; exponential on the `regex` module too."""


def lines_of(*texts: bytes) -> Lines:
    out, offset = [], 0
    for data in texts:
        out.append(RawLine(offset, offset + len(data) + 1, data))
        offset += len(data) + 1
    return Lines.of(out)


def shipped(parser: SourceParser, *texts: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(d.body) for d in parser.documents(lines_of(*texts), CONTEXT)]


# -- issue 13 item 2: no regex stalls the agent

@pytest.mark.timeout(60)
@pytest.mark.parametrize("keys", [
    {"regex": r"^(?P<x>(a+)+)$"},
    {"format": "json", "include": [r"^(a+)+$"]},
    {"format": "json", "exclude": [r"^(a+)+$"]},
])
def test_catastrophic_user_regex_runs_in_linear_time(keys: dict[str, Any]) -> None:
    parser, counters = make_parser(**keys)
    docs = shipped(parser, EVIL.encode(), b'{"a": 1}')
    if "regex" in keys:
        assert [d["message"] for d in docs] == [EVIL, '{"a": 1}']
        assert counters.unmatched == 2
    elif "include" in keys:
        assert docs == [] and counters.filtered == 2
    else:
        assert docs[0]["message"] == EVIL and docs[0]["agent"]["parse_error"].startswith("invalid JSON")
        assert docs[1]["a"] == 1 and counters.filtered == 0


@pytest.mark.timeout(60)
def test_catastrophic_multiline_start_runs_in_linear_time() -> None:
    parser, _ = make_parser(format="json", multiline={"start": r"^(a+)+$"})
    assert parser.source.multiline is not None
    assembler = MultilineAssembler(parser.source.multiline.start, 1 << 20)
    events = assembler.feed(lines_of(b"first", EVIL.encode(), b"a" * 10))
    last = assembler.flush()
    assert [e.data for e in events] == [b"first\n" + EVIL.encode()]
    assert last is not None and last.data == b"a" * 10


@pytest.mark.timeout(60)
def test_schema_on_hostile_words_runs_in_linear_time() -> None:
    """Six tokens that each match a 30-colon word in 30 ways, then one that fails: 30^6 tries
    when tokens backtrack into each other."""
    schema = "$a:$b $c:$d $e:$f $g:$h $i:$j $k:$l end"
    word = ":".join(["w"] * 31)
    parser, counters = make_parser(schema=schema)
    docs = shipped(parser, " ".join([word] * 6 + ["nope"]).encode(),
                   " ".join([word] * 6 + ["end"]).encode())
    assert docs[0]["agent"]["parse_error"] == "line does not match the schema"
    assert docs[1]["a"] == "w" and docs[1]["b"] == ":".join(["w"] * 30)
    assert (counters.matched, counters.unmatched) == (1, 1)


@pytest.mark.timeout(60)
def test_schema_with_two_lazy_captures_in_a_token_runs_in_linear_time() -> None:
    parser, counters = make_parser(schema=r"$u@$h:$p]")
    word = ("@" + ":" * 3) * 4000
    docs = shipped(parser, word.encode(), b"bob@host:22]")
    assert docs[0]["agent"]["parse_error"] == "line does not match the schema"
    assert {k: docs[1][k] for k in "uhp"} == {"u": "bob", "h": "host", "p": "22"}
    assert (counters.matched, counters.unmatched) == (1, 1)


@pytest.mark.timeout(60)
def test_fallback_pattern_is_time_bounded_and_its_line_shipped_raw() -> None:
    from agent.patterns import TimedPattern

    parser, counters = make_parser(regex=BACKREF_EVIL)
    assert isinstance(parser.source.pattern, TimedPattern)
    docs = shipped(parser, b"a" * 40, b"aaaab")
    assert docs[0]["message"] == "a" * 40
    assert docs[0]["agent"]["parse_error"].startswith("cannot parse this line: PatternTimeout")
    assert docs[1]["x"] == "aa" and "parse_error" not in docs[1]["agent"]
    assert (counters.matched, counters.unmatched) == (1, 1)


@pytest.mark.timeout(60)
def test_fallback_include_that_times_out_ships_the_line_raw() -> None:
    parser, counters = make_parser(format="json", include=[BACKREF_EVIL])
    docs = shipped(parser, b"a" * 40)
    assert docs[0]["message"] == "a" * 40 and "PatternTimeout" in docs[0]["agent"]["parse_error"]
    assert counters.unmatched == 1 and counters.filtered == 0


def test_check_warns_about_patterns_re2_cannot_run(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "agent.yaml").write_text('couchdb: {url: "http://127.0.0.1:5984"}\nstate_dir: state\n')
    (tmp_path / "conf.d" / "s.yaml").write_text(
        "name: s\npaths: [/x]\nregex: '(?<=Ban )(?<ip>\\S+)'\ninclude: ['NOTICE', '(\\w)\\1']\n"
        "multiline: {start: '^\\d'}\n")
    assert main(["check", "-c", str(tmp_path / "agent.yaml")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, captured.err
    assert warnings[0].startswith("warning: s: regex: '(?<=Ban )(?P<ip>\\\\S+)' cannot run on RE2")
    assert warnings[1].startswith("warning: s: include: '(\\\\w)\\\\1' cannot run on RE2")
    assert captured.out.splitlines()[-1].startswith("ok: 1 source(s)")


def reference_schema(schema: str) -> re.Pattern[str]:
    """The schema as plain backtracking `re` (before atomic groups and RE2): the meaning."""
    from agent.schema import _compile_token

    seen: set[str] = set()
    tokens = schema.split()
    parts = [_compile_token(t, i == len(tokens) - 1, seen) for i, t in enumerate(tokens)]
    return re.compile("^" + r"\s+".join(p.text.format(S=r"\S") + (r"(?!\S)" if p.ends_in_literal
                                                                     else "") for p in parts))


SCHEMAS = [r"$a:$b", r"$u@$h:$p", r"$u@$h:$p] $rest...", r"_ [$a:$b:$c] $d", r"$a-$b-$c x",
           r"$a $b=$c;", r"\[$a:$b\]"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SCHEMAS),
       st.lists(st.sampled_from(["a", "b", ":", "@", "]", "[", "-", "=", ";", " ", "\t", "\u00a0",
                                 "\u3000", "\n", "x", "é"]), max_size=30).map("".join))
def test_schema_matches_what_backtracking_re_matches(schema: str, line: str) -> None:
    """Atomic tokens (on `re`) and RE2 (two lazy captures in a token) change no match."""
    expected = reference_schema(schema).match(line)
    found = compile_schema(schema).match(line)
    assert (found is None) == (expected is None)
    if found is not None and expected is not None:
        assert found.groupdict() == expected.groupdict()


# -- issue 13 item 3: a line never crashes the agent

def test_json_nested_300_deep_ships_raw_with_parse_error() -> None:
    deep = b'{"a":' + b"[" * 300 + b"]" * 300 + b"}"
    parser, counters = make_parser(format="json")
    docs = shipped(parser, deep, b'{"ok": 1}')
    assert docs[0]["message"] == deep.decode()
    assert docs[0]["agent"]["parse_error"].startswith("JSON that cannot be stored")
    assert docs[1]["ok"] == 1
    assert (counters.matched, counters.unmatched) == (1, 1)


@pytest.mark.parametrize("on_error", ["ship", "drop"])
def test_unencodable_fields_ship_raw_or_drop_and_are_recounted(on_error: str) -> None:
    """Whatever slips past the extractor, encoding one line's fields cannot stop the batch."""
    parser, counters = make_parser(format="json", on_parse_error=on_error, fields={"m": "s"})
    extract = parser._extract
    parser._extract = lambda text: ({"bad": {1j}} if "bad" in text else extract(text)[0], None)
    docs = shipped(parser, b'{"bad": 1}', b'{"ok": 1}')
    if on_error == "ship":
        assert docs[0]["message"] == '{"bad": 1}' and docs[0]["m"] == "s"
        assert "cannot encode" in docs[0]["agent"]["parse_error"]
        assert docs[1]["ok"] == 1
    else:
        assert [d["ok"] for d in docs] == [1] and counters.dropped_unmatched == 1
    assert (counters.matched, counters.unmatched) == (1, 1)


# -- issue 9 item 6: reserved names are renamed without collisions

@pytest.mark.parametrize("keys", [
    {"format": "json"},
    {"regex": r"(?P<_id>\S+) (?P<x_id>\S+) (?P<xx_id>\S+) (?P<agent>\S+) (?P<xagent>\S+)"},
    {"schema": "$_id $x_id $xx_id $agent $xagent"},
])
def test_reserved_names_and_their_renamings_all_survive(keys: dict[str, Any]) -> None:
    parser, _ = make_parser(**keys)
    line = (b'{"_id": "1", "x_id": "2", "xx_id": "3", "agent": "4", "xagent": "5"}'
            if "format" in keys else b"1 2 3 4 5")
    (doc,) = shipped(parser, line)
    assert doc["_id"].startswith("t:")
    assert {k: v for k, v in doc.items() if k not in ("_id", "agent")} == {
        "x_id": "1", "xx_id": "2", "xxx_id": "3", "xagent": "4", "xxagent": "5"}


NAMES = st.lists(st.sampled_from(["_", "x", "a", "agent", "meta", "id", "_rev"]), min_size=1,
                 max_size=4).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(NAMES, st.integers(-(2**31), 2**31), max_size=8),
       st.sampled_from(["agent", "meta", "xm", "x"]))
def test_renaming_never_loses_a_field(fields: dict[str, int], meta_key: str) -> None:
    from agent.parser import renamer

    rename = renamer(meta_key)
    renamed = {rename(k): v for k, v in fields.items()}
    assert len(renamed) == len(fields)
    assert sorted(renamed.values()) == sorted(fields.values())
    assert not any(k.startswith("_") or k == meta_key for k in renamed)
    parser, _ = make_parser(format="json", metadata_key=meta_key)
    (doc,) = shipped(parser, orjson.dumps(fields))
    body = {k: v for k, v in doc.items() if k not in ("_id", meta_key)}
    assert body == renamed


@settings(max_examples=300, deadline=None)
@given(word=st.text(alphabet=st.characters(blacklist_characters=".^$*+?{}[]\\|()"), max_size=6),
       line=st.text(max_size=30))
def test_a_plain_word_pattern_matches_as_re_would(word: str, line: str) -> None:
    pattern = compile_pattern(word)
    assert isinstance(pattern, LiteralPattern)
    assert (pattern.search(line) is not None) == (re.search(word, line) is not None)
    assert (pattern.match(line) is not None) == (re.match(word, line) is not None)
    assert pattern.search(word + line) is not None and pattern.match(word + line) is not None


def test_an_agent_with_only_words_and_schemas_never_loads_an_engine(tmp_path: Any) -> None:
    """RE2 and the `regex` module take 3 MiB resident between them, prometheus_client and
    aiohttp's server 3 more: an agent whose config needs none of them (the seed's fail2ban
    source, no metrics.listen) must not load them (bench/many_files.py)."""
    code = f"""
import sys
from pathlib import Path
import agent.cli, agent.daemon
from agent import config
from agent.parser import SourceParser
from agent.counters import SourceCounters
cfg = config.load(Path({str(tmp_path / "agent.yaml")!r}))
parsers = [SourceParser(s, host="h", counters=SourceCounters()) for s in cfg.sources]
print(sorted(m for m in ("re2", "regex", "prometheus_client") if m in sys.modules))
"""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "agent.yaml").write_text(
        f"couchdb: {{url: 'http://127.0.0.1:5984'}}\nstate_dir: {tmp_path / 'state'}\n")
    (tmp_path / "conf.d" / "f.yaml").write_text(
        "name: f\npaths: [/var/log/f.log]\ninclude: [NOTICE, Ban]\nexclude: ['Unban ']\n"
        "schema: '{date} {hour} {process}: {level} [{jail}] Ban {ip}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "[]", out.stderr
    (tmp_path / "conf.d" / "f.yaml").write_text(
        "name: f\npaths: [/var/log/f.log]\ninclude: ['N(OT)?ICE']\nformat: json\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "['re2']", out.stderr
