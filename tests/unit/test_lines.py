"""Line framing: offsets, partial lines, CRLF and the length cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.lines import LineSplitter
from agent.types import RawLine


def feed(splitter: LineSplitter, data: bytes) -> list[RawLine]:
    return list(splitter.feed(data))


def test_complete_lines_only_and_offsets() -> None:
    s = LineSplitter(100)
    assert feed(s, b"ab\ncd") == [RawLine(0, 3, b"ab")]
    assert feed(s, b"e\n\n") == [RawLine(3, 7, b"cde"), RawLine(7, 8, b"")]
    assert s.flush() is None


def test_crlf_belongs_to_the_line_ending_even_when_split() -> None:
    s = LineSplitter(100)
    assert feed(s, b"a\r") == []
    assert feed(s, b"\nb\r\n") == [RawLine(0, 3, b"a"), RawLine(3, 6, b"b")]


def test_resumes_at_an_offset() -> None:
    s = LineSplitter(100, offset=50)
    assert feed(s, b"x\n") == [RawLine(50, 52, b"x")]


def test_flush_returns_the_unterminated_last_line() -> None:
    s = LineSplitter(100)
    feed(s, b"a\nlast")
    assert s.flush() == RawLine(2, 6, b"last")
    assert s.flush() is None


def test_long_line_in_one_chunk_is_truncated_and_offsets_stay_in_step() -> None:
    s = LineSplitter(4)
    assert feed(s, b"123456789\nok\n") == [RawLine(0, 10, b"1234", truncated=True),
                                         RawLine(10, 13, b"ok")]


def test_line_exactly_at_the_limit_with_crlf_arriving_apart_is_not_truncated() -> None:
    s = LineSplitter(4)
    assert feed(s, b"abcd") == []
    assert feed(s, b"\r") == []
    assert feed(s, b"\n") == [RawLine(0, 6, b"abcd")]


def test_long_line_over_many_chunks_keeps_memory_bounded() -> None:
    s = LineSplitter(4)
    for _ in range(1000):
        assert feed(s, b"x" * 1000) == []
        assert len(s._tail) <= 4
    assert feed(s, b"y\nz\n") == [RawLine(0, 1_000_002, b"xxxx", truncated=True),
                                 RawLine(1_000_002, 1_000_004, b"z")]


PIECES = st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\r\n", b"\xff", b"xyz" * 5])
CHUNKS = st.lists(st.lists(PIECES, max_size=8).map(b"".join), max_size=30)


@given(CHUNKS, st.integers(min_value=1, max_value=16))
def test_any_chunking_frames_the_same_lines(chunks: list[bytes], limit: int) -> None:
    data = b"".join(chunks)
    s = LineSplitter(limit)
    lines = [line for chunk in chunks for line in s.feed(chunk)]
    last = s.flush()
    if last is not None:
        lines.append(last)
    expected_parts = data.split(b"\n")
    if expected_parts and expected_parts[-1] == b"":
        expected_parts.pop()
    assert len(lines) == len(expected_parts)
    offset = 0
    for line, part in zip(lines, expected_parts, strict=True):
        assert line.offset == offset
        offset += len(part) + 1
        body = part[:-1] if part.endswith(b"\r") else part
        assert line.data == body[:limit]
        assert line.truncated == (len(body) > limit)
    assert (lines[-1].end if lines else 0) == len(data)
