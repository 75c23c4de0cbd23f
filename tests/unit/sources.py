"""Sources and parsers as the unit tests build them from a few keys, and a fixed file id."""

from __future__ import annotations

from typing import Any

from agent.config import Problem, SourceConfig, source_from_mapping
from agent.counters import SourceCounters
from agent.parser import SourceParser
from agent.types import FileId

FILE = FileId(0xFE00, 0x1234, "ab12cd34ef56ab78")


def make_parser(**keys: Any) -> tuple[SourceParser, SourceCounters]:
    """A parser for source `t` (host `host1`) with `keys` added, and its counters; the keys
    must make a valid source."""
    problems: list[Problem] = []
    source = source_from_mapping("test.yaml", {"name": "t", "paths": ["/x"], **keys}, problems)
    assert not problems, problems
    assert isinstance(source, SourceConfig)
    counters = SourceCounters()
    return SourceParser(source, "host1", counters), counters


def source(**keys: Any) -> SourceConfig:
    """Source `s` (schema `$m...`) with `keys` added; the keys must make a valid source."""
    problems: list[Problem] = []
    made = source_from_mapping("s.yaml", {"name": "s", "schema": "$m...", **keys}, problems)
    assert made is not None, problems
    return made
