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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REST_SUFFIX = "..."


class SchemaError(ValueError):
    """The schema text is not valid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class _Capture:
    name: str


def compile_schema(schema: str) -> re.Pattern[str]:
    """Return an anchored regex with one named group per `$name` of `schema`."""
    tokens = schema.split()
    if not tokens:
        raise SchemaError("the schema is empty; write at least one token, e.g. '$date $message...'")
    seen: set[str] = set()
    parts: list[str] = []
    for index, token in enumerate(tokens):
        is_last = index == len(tokens) - 1
        parts.append(_compile_token(token, is_last, seen))
    return re.compile("^" + r"\s+".join(parts))


def _compile_token(token: str, is_last: bool, seen: set[str]) -> str:
    if token == "_":
        return r"\S+"
    pieces = _split_token(token)
    rest = _rest_capture(pieces)
    if rest is not None:
        if not is_last:
            raise SchemaError(f"'${rest}{REST_SUFFIX}' captures the rest of the line, "
                              "so it must be the last token")
        _claim(rest, seen)
        # DOTALL: a multi-line event's rest includes its continuation lines.
        return f"(?P<{rest}>(?s:.*))"
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            out.append(re.escape(piece))
            continue
        _claim(piece.name, seen)
        following = pieces[i + 1] if i + 1 < len(pieces) else None
        if isinstance(following, _Capture):
            raise SchemaError(f"captures '${piece.name}' and '${following.name}' touch; "
                              "put literal text between them")
        out.append(f"(?P<{piece.name}>\\S+)" if following is None else f"(?P<{piece.name}>\\S+?)")
    # A token that ends in literal text must not match a longer word ("Ban" vs "Banned").
    ends_in_literal = isinstance(pieces[-1], str)
    return "".join(out) + (r"(?!\S)" if ends_in_literal else "")


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
