"""Compiling users' patterns so that no line can stall the agent.

Python's `re` backtracks: `^(a+)+$` against 40 `a`s and a `b` takes hours, and it
would freeze every source (and SIGTERM) while it runs. So a pattern written by a
user (`regex`, `include`, `exclude`, `multiline.start`) runs on RE2 (`google-re2`),
whose matching time is linear in the line. RE2 has no backreferences and no
lookaround; a pattern that needs them runs on the `regex` module with a time
limit per match (`MATCH_TIMEOUT`), and `agent check` warns about it
(`fallback_warnings`). A match that hits the limit raises `PatternTimeout`; the
parser ships that line raw with `parse_error`.

Why RE2 and not the `regex` module for everything (figures from
`bench/parse_speed.py --engines`, in README): through its compiled binding
(`Re2Pattern`) RE2 is faster per line than `regex` with a timeout, and it is
linear whatever the line, while a time limit lets a hostile line cost the whole
limit, line after line. Token schemas are compiled by `agent.schema` to patterns
that are linear on `re` itself (`linear_re`), so the common case keeps `re`'s speed.
A pattern without regex syntax (`include: [ERROR]`) is a `LiteralPattern`, a plain
substring test; RE2 is loaded only for the first pattern that needs it (1.7 MiB
resident that an agent with only words and schemas never carries).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

MATCH_TIMEOUT = 0.05
"""Seconds one match of a fallback (non-RE2) pattern may take before the line is given up."""

REGEX_SYNTAX = frozenset(".^$*+?{}[]\\|()")
"""Characters that make a pattern more than the word it spells."""

_TEXT = operator.attrgetter("pattern")

_NAMED_GROUP_PCRE = re.compile(r"(?<!\\)((?:\\\\)*)\(\?<(?=[A-Za-z_])")


class PatternTimeout(TimeoutError):
    """A fallback pattern's match took longer than `MATCH_TIMEOUT`."""


class Match(Protocol):
    def groupdict(self) -> dict[str, Any]: ...


class Pattern(Protocol):
    """What the agent uses of a compiled pattern: `re.Pattern`, RE2's and the time-bounded
    fallback all have it."""

    @property
    def pattern(self) -> str: ...

    @property
    def groupindex(self) -> Mapping[str, int]: ...

    def search(self, text: str, /) -> Match | None: ...

    def match(self, text: str, /) -> Match | None: ...


class _SameText:
    """Patterns compiled from the same text by the same engine are equal: a reload compares
    sources, and an unchanged source must not be stopped and started again."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and _TEXT(other) == _TEXT(self)

    def __hash__(self) -> int:
        return hash((type(self), _TEXT(self)))


class TimedPattern(_SameText):
    """A `regex`-module pattern whose every match is bounded by `MATCH_TIMEOUT`."""

    __slots__ = ("_compiled", "reason")

    def __init__(self, compiled: Any, reason: str) -> None:
        self._compiled = compiled
        self.reason = reason
        """Why RE2 could not run it (for `agent check`)."""

    @property
    def pattern(self) -> str:
        text: str = self._compiled.pattern
        return text

    @property
    def groupindex(self) -> Mapping[str, int]:
        index: Mapping[str, int] = self._compiled.groupindex
        return index

    def search(self, text: str) -> Match | None:
        return self._bounded(self._compiled.search, text)

    def match(self, text: str) -> Match | None:
        return self._bounded(self._compiled.match, text)

    def _bounded(self, run: Any, text: str) -> Match | None:
        try:
            found: Match | None = run(text, timeout=MATCH_TIMEOUT)
        except TimeoutError:
            raise PatternTimeout(f"the pattern {self.pattern!r} took over {MATCH_TIMEOUT}s "
                                 "on this line") from None
        return found


class Re2Pattern(_SameText):
    """A pattern on RE2, through google-re2's compiled-regex binding (`re2._re2.RE2`).

    google-re2's `re`-like wrapper costs 8.7 µs per match of a fail2ban line, in Python glue
    (a generator, offset tables, a match object); this costs 1.9 µs (`re`: 0.6 µs, the
    `regex` module with a timeout: 3.0 µs). Offsets are in the UTF-8 text, so each group is
    its bytes decoded.
    """

    __slots__ = ("_anchor_start", "_engine", "_groups", "_unanchored", "groupindex", "pattern")

    def __init__(self, text: str) -> None:
        import re2
        from re2 import _re2

        options = re2.Options()
        # RE2 otherwise prints every pattern it refuses to stderr; the refusal is handled here.
        options.log_errors = False
        engine = _re2.RE2(text.encode("utf-8", "surrogatepass"), options)
        if not engine.ok():
            raise re2.error(engine.error())
        self._engine = engine
        self._unanchored, self._anchor_start = _re2.RE2.Anchor.UNANCHORED, _re2.RE2.Anchor.ANCHOR_START
        self.pattern = text
        self.groupindex: Mapping[str, int] = {
            name.decode(): index for name, index in engine.NamedCapturingGroups()}
        self._groups = tuple(sorted(self.groupindex.items(), key=lambda item: item[1]))

    def search(self, text: str, /) -> Re2Match | None:
        return self._run(self._unanchored, text)

    def match(self, text: str, /) -> Re2Match | None:
        return self._run(self._anchor_start, text)

    def _run(self, anchor: Any, text: str) -> Re2Match | None:
        data = text.encode("utf-8", "surrogatepass")
        spans = self._engine.Match(anchor, data, 0, len(data))
        if spans[0][0] < 0:
            return None
        return Re2Match({name: None if spans[index][0] < 0 else
                         data[spans[index][0]:spans[index][1]].decode("utf-8", "surrogatepass")
                         for name, index in self._groups})


class Re2Match:
    """The named fields of a match (of RE2, or of a `LiteralPattern`: none)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str | None]) -> None:
        self._fields = fields

    def groupdict(self) -> dict[str, str | None]:
        return self._fields


class LiteralPattern(_SameText):
    """A pattern that is a plain word: a substring test, faster than any engine."""

    __slots__ = ("pattern",)

    groupindex: Mapping[str, int] = MappingProxyType({})

    def __init__(self, text: str) -> None:
        self.pattern = text

    def search(self, text: str, /) -> Re2Match | None:
        return Re2Match({}) if self.pattern in text else None

    def match(self, text: str, /) -> Re2Match | None:
        return Re2Match({}) if text.startswith(self.pattern) else None


def compile_pattern(text: str) -> Pattern:
    """A user's pattern: a plain word as a `LiteralPattern`, else on RE2 if it can run it, else
    time-bounded on the `regex` module. Raises `re.error` (what the config loader reports) if
    none can compile it."""
    if not REGEX_SYNTAX.intersection(text):
        return LiteralPattern(text)
    import re2

    try:
        return Re2Pattern(text)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
    # Imported here, not at the top: it adds 10 ms to every start, and most configs never need it.
    import regex

    try:
        return TimedPattern(regex.compile(text), reason)
    except regex.error as exc:
        raise re.error(str(exc)) from None


def compile_fields_regex(text: str) -> Pattern:
    """A `regex:` source's pattern, accepting the PCRE/Onigmo `(?<name>...)` spelling of named
    groups; it must name at least one field."""
    pattern = compile_pattern(_NAMED_GROUP_PCRE.sub(r"\1(?P<", text))
    if not pattern.groupindex:
        raise re.error("it has no named group; name each field, e.g. (?P<ip>\\S+)")
    return pattern


def linear_re(text: str) -> Pattern:
    """A pattern built by the agent itself (a token schema) and known to match in linear time
    on `re`, which is several times faster per match than the engines above."""
    return re.compile(text)


def fallback_warnings(patterns: Mapping[str, Iterable[Pattern | None]]) -> list[str]:
    """One line per pattern that runs on the time-bounded fallback, keyed by the config key."""
    warnings = []
    for key, items in patterns.items():
        for pattern in items:
            if isinstance(pattern, TimedPattern):
                warnings.append(f"{key}: {pattern.pattern!r} cannot run on RE2 ({pattern.reason}); "
                                f"it runs with a {MATCH_TIMEOUT}s limit per line instead, and a "
                                "line that reaches it is shipped raw with parse_error. Rewrite "
                                "it without backreferences or lookaround to make it linear-time")
    return warnings
