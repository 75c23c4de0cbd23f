"""The token-schema language: compiles a schema such as `$date $hour _ \\[$process\\] $ip` to a regex.

The language (compatible with the seed's `jsonformat` on its documented use):

- Runs of whitespace separate tokens; in a line, any run of whitespace
  separates them too.
- `_` alone skips one token.
- `$name` captures; a name matches `[A-Za-z_][A-Za-z0-9_]*`. Inside a token
  it captures up to the literal text that follows it.
- `$name...` as the last token captures the rest of the line, spaces
  included (possibly empty).
- Every other character is literal; `\\` makes the next character literal.
- The match is anchored at the start of the line and each token ends at
  whitespace or at the end of the line. Tokens after the last one in the
  schema are ignored (the schema describes a prefix): end with `$rest...`
  to keep them.

Compilation is pure and done once per source at config load.

No line can make a schema's match slow. Each token sits in an atomic group: a
token can only end where its word ends, so once it matched, no other way of
matching it could help a later token, and `re` never retries it (without this,
`$a:$b $c:$d ...` on words full of colons backtracks exponentially). Inside a
token, one lazy capture (`$a:$b`) is a single scan of its word. Two or more
(`$user@$host:$port`) can scan a word once per candidate split, so such a
schema runs on RE2, which is linear whatever the line, with whitespace spelled
out so that it splits words exactly as `re` and `str.split` do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.patterns import Pattern, compile_pattern, linear_re

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REST_SUFFIX = "..."
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
"""Every character `re`'s `\\s` and `str.split` take for whitespace (none lies past U+3000);
RE2's `\\s` is ASCII only."""
_RE2_SPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]"
_RE2_NOT_SPACE = "[^" + _RE2_SPACE[1:]


class SchemaError(ValueError):
    """The schema text is not valid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class _Capture:
    name: str


@dataclass(frozen=True, slots=True)
class _Token:
    """One token's regex with `\\S` written as `{S}`, and how many lazy captures it has."""

    text: str
    lazy: int
    ends_in_literal: bool


def compile_schema(schema: str) -> Pattern:
    """Return an anchored pattern with one named group per `$name` of `schema`."""
    texts = schema_texts(schema)
    return linear_re(texts.re) if texts.linear_on_re else compile_pattern(texts.re2)


@dataclass(frozen=True, slots=True)
class SchemaTexts:
    """A schema's regex for `re` (atomic tokens) and for RE2 (same matches), and whether the
    first is linear-time (at most one lazy capture per token)."""

    re: str
    re2: str
    linear_on_re: bool


def schema_texts(schema: str) -> SchemaTexts:
    tokens = schema.split()
    if not tokens:
        raise SchemaError("the schema is empty; write at least one token, e.g. '$date $message...'")
    seen: set[str] = set()
    parts = [_compile_token(token, index == len(tokens) - 1, seen)
             for index, token in enumerate(tokens)]
    on_re = "^" + r"\s+".join(
        "(?>" + p.text.format(S=r"\S") + (r"(?!\S)" if p.ends_in_literal else "") + ")"
        for p in parts)
    # On RE2: a token ending in literal text is followed by whitespace (the separator) or, for
    # the last one, by whitespace or the end, which is what the lookahead says on `re`.
    tail = f"(?:{_RE2_SPACE}|$)" if parts[-1].ends_in_literal else ""
    on_re2 = "^" + f"{_RE2_SPACE}+".join(p.text.format(S=_RE2_NOT_SPACE) for p in parts) + tail
    return SchemaTexts(on_re, on_re2, all(part.lazy <= 1 for part in parts))


def _compile_token(token: str, is_last: bool, seen: set[str]) -> _Token:
    if token == "_":
        return _Token("{S}+", 0, False)
    pieces = _split_token(token)
    rest = _rest_capture(pieces)
    if rest is not None:
        if not is_last:
            raise SchemaError(f"'${rest}{REST_SUFFIX}' captures the rest of the line, "
                              "so it must be the last token")
        _claim(rest, seen)
        # DOTALL: a multi-line event's rest includes its continuation lines.
        return _Token(f"(?P<{rest}>(?s:.*))", 0, False)
    out: list[str] = []
    lazy = 0
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            out.append(_escape(piece))
            continue
        _claim(piece.name, seen)
        following = pieces[i + 1] if i + 1 < len(pieces) else None
        if isinstance(following, _Capture):
            raise SchemaError(f"captures '${piece.name}' and '${following.name}' touch; "
                              "put literal text between them")
        if following is None:
            out.append(f"(?P<{piece.name}>{{S}}+)")
        else:
            out.append(f"(?P<{piece.name}>{{S}}+?)")
            lazy += 1
    # A token that ends in literal text must not match a longer word ("Ban" vs "Banned").
    return _Token("".join(out), lazy, isinstance(pieces[-1], str))


def _escape(literal: str) -> str:
    """`re.escape`, with the braces doubled for `str.format`."""
    return re.escape(literal).replace("{", "{{").replace("}", "}}")


def _rest_capture(pieces: list[str | _Capture]) -> str | None:
    if len(pieces) == 2 and isinstance(pieces[0], _Capture) and pieces[1] == REST_SUFFIX:
        return pieces[0].name
    return None


def _claim(name: str, seen: set[str]) -> None:
    if name in seen:
        raise SchemaError(f"'${name}' is captured twice; each name may appear once")
    seen.add(name)


def _split_token(token: str) -> list[str | _Capture]:
    """Split one token into literal strings and captures."""
    pieces: list[str | _Capture] = []
    literal: list[str] = []
    i = 0
    while i < len(token):
        char = token[i]
        if char == "\\":
            if i + 1 == len(token):
                raise SchemaError(f"token '{token}' ends with '\\'; escape something or remove it")
            literal.append(token[i + 1])
            i += 2
        elif char == "$":
            match = NAME.match(token, i + 1)
            if match is None:
                raise SchemaError(f"'$' in token '{token}' is not followed by a name "
                                  "([A-Za-z_][A-Za-z0-9_]*); write '\\$' for a literal dollar")
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_Capture(match.group()))
            i = match.end()
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return pieces
