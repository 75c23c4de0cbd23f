"""UTF-16/32 framing, multi-line events, and the identity helpers: bytes in, records out."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.identity import FINGERPRINT_BYTES, fingerprint, last_line_end, marker, read_marker
from agent.lines import LineSplitter, WideLineSplitter, splitter_for
from agent.multiline import MultilineAssembler
from agent.types import Lines, RawLine


def frame(splitter: LineSplitter | WideLineSplitter, chunks: list[bytes]) -> list[RawLine]:
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    last = splitter.flush()
    return lines + ([last] if last is not None else [])


def test_utf16_newlines_are_found_only_at_code_unit_boundaries() -> None:
    text = "a\u0a00b\r\nsecond\nthird"
    data = text.encode("utf-16-le")
    lines = frame(splitter_for("utf-16-le", 100), [data[:3], data[3:9], data[9:]])
    assert [line.data.decode("utf-16-le") for line in lines] == ["a\u0a00b", "second", "third"]
    assert lines[0].offset == 0 and lines[1].offset == lines[0].end and lines[-1].end == len(data)


@given(st.lists(st.sampled_from(["x", "\n", "\r\n", "\u0a00", "\u0d0a", "é", "𝄞"]), max_size=40),
       st.sampled_from(["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"]),
       st.integers(min_value=1, max_value=7))
def test_wide_framing_matches_the_decoded_text(pieces: list[str], encoding: str, step: int) -> None:
    text = "".join(pieces)
    data = text.encode(encoding)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    lines = frame(WideLineSplitter(encoding, 1000), chunks)
    expected = text.split("\n")
    if expected[-1] == "":
        expected.pop()
    assert [line.data.decode(encoding) for line in lines] == [e.removesuffix("\r") for e in expected]
    assert (lines[-1].end if lines else 0) == len(data)


def test_wide_long_lines_are_truncated_and_stay_in_step() -> None:
    data = ("x" * 50 + "\nok\n").encode("utf-16-le")
    lines = frame(WideLineSplitter("utf-16-le", 10), [data[i:i + 3] for i in range(0, len(data), 3)])
    assert lines[0] == RawLine(0, 102, "xxxxx".encode("utf-16-le"), truncated=True)
    assert lines[1].data == "ok".encode("utf-16-le") and lines[1].end == len(data)


START = re.compile(r"^\[\d{4}-")


def lines_of(text: str) -> Lines:
    return LineSplitter(10_000).feed(text.encode())


def test_multiline_joins_continuation_lines_and_keeps_offsets() -> None:
    text = "head\n[2016-1] a\n\tat x\n\tat y\n[2016-2] b\n[2016-3] c\n\tat z\n"
    assembler = MultilineAssembler(START, 1000)
    events = list(assembler.feed(lines_of(text)))
    last = assembler.flush()
    assert last is not None
    events.append(last)
    assert [e.data for e in events] == [b"head", b"[2016-1] a\n\tat x\n\tat y", b"[2016-2] b",
                                       b"[2016-3] c\n\tat z"]
    assert events[1].offset == 5 and events[1].end == text.index("[2016-2]")
    assert events[-1].end == len(text)
    assert assembler.flush() is None


def test_multiline_event_over_the_limit_is_truncated_but_covers_all_its_lines() -> None:
    assembler = MultilineAssembler(START, 12)
    events = list(assembler.feed(lines_of("[2016-1] abc\n more\n more\n[2016-2]\n")))
    assert events == [RawLine(0, 25, b"[2016-1] abc", truncated=True)]


def test_fingerprint_covers_the_first_line_or_the_window() -> None:
    assert fingerprint(b"partial") is None
    assert fingerprint(b"a\nb") == fingerprint(b"a\nc") != fingerprint(b"b\n")
    assert fingerprint(b"x" * FINGERPRINT_BYTES) == fingerprint(b"x" * FINGERPRINT_BYTES + b"y\n")


def test_markers_and_last_line_end(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one\ntwo\nthr")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_marker(fd, 8) == marker(b"one\ntwo\n")
        assert last_line_end(fd, 11) == 8
        assert last_line_end(fd, 11, block=2) == 8
        assert last_line_end(fd, 3) == 0
    finally:
        os.close(fd)
    wide = tmp_path / "w"
    wide.write_bytes("a\u0a00\nb".encode("utf-16-le"))
    fd = os.open(wide, os.O_RDONLY)
    try:
        assert last_line_end(fd, 8, "\n".encode("utf-16-le"), block=3) == 6
    finally:
        os.close(fd)
