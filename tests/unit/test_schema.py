"""The token-schema language, bytes in and fields out, without any I/O."""

from __future__ import annotations

import pytest

from agent.schema import SchemaError, compile_schema

SEED = r"$date $hour _ _ _ \[$process\] _ $ip"
SEED_LINE = "2017-06-14 17:16:12,329 fail2ban.actions        [1112]: NOTICE  [sshd] Ban 59.45.175.88"


def fields(schema: str, line: str) -> dict[str, str] | None:
    match = compile_schema(schema).match(line)
    return None if match is None else match.groupdict()


def test_seed_example() -> None:
    assert fields(SEED, SEED_LINE) == {"date": "2017-06-14", "hour": "17:16:12,329",
                                       "process": "sshd", "ip": "59.45.175.88"}


def test_match_is_anchored_at_line_start() -> None:
    assert fields("$a Ban $ip", "x y Ban 1.2.3.4") is None
    assert fields("$a Ban $ip", "y Ban 1.2.3.4") == {"a": "y", "ip": "1.2.3.4"}


def test_literal_token_must_match_a_whole_token() -> None:
    assert fields("$a Ban $ip", "x Banned 1.2.3.4") is None
    assert fields("$a Ban", "x Banned") is None


def test_runs_of_whitespace_and_tabs_separate_tokens() -> None:
    assert fields("$a $b", "one \t  two") == {"a": "one", "b": "two"}


def test_extra_trailing_tokens_are_ignored() -> None:
    assert fields("$a $b", "one two three four") == {"a": "one", "b": "two"}


def test_rest_capture_takes_the_rest_of_the_line() -> None:
    assert fields("$a $msg...", "one two  three") == {"a": "one", "msg": "two  three"}
    assert fields("$a $msg...", "one ") == {"a": "one", "msg": ""}


def test_too_few_tokens_do_not_match() -> None:
    assert fields("$a $b $c", "one two") is None


def test_schema_characters_never_leak_into_the_regex() -> None:
    schema = r"$a (x+) [y] .* $b"
    assert fields(schema, "1 (x+) [y] .* 2") == {"a": "1", "b": "2"}
    assert fields(schema, "1 (xx) [y] ab 2") is None


def test_escape_makes_next_character_literal() -> None:
    assert fields(r"\$$cost \_ $x", "$12 _ y") == {"cost": "12", "x": "y"}


def test_capture_inside_token_stops_at_following_literal() -> None:
    assert fields("$user@$host:$port", "bob@example.com:22") == {
        "user": "bob", "host": "example.com", "port": "22"}


def test_names_allow_upper_case_digits_and_underscores() -> None:
    assert fields("$Date_1 $_x", "a b") == {"Date_1": "a", "_x": "b"}


@pytest.mark.parametrize(("schema", "message"), [
    ("", "empty"),
    ("$a $a", "captured twice"),
    ("$a$b", "touch"),
    ("$ 1", "not followed by a name"),
    ("$9x", "not followed by a name"),
    ("$rest... $b", "last token"),
    ("a\\", "ends with"),
])
def test_bad_schemas_are_rejected_with_a_reason(schema: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        compile_schema(schema)
