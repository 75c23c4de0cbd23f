"""UTF-16 and UTF-32 framing gives the same lines however the file is cut into reads (issue 13
review: a line exactly at the limit, ended by CRLF, was marked truncated when a read ended
inside its newline)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.lines import WideLineSplitter

Framed = list[tuple[bytes, int, int, bool]]


def frame(encoding: str, limit: int, data: bytes, cuts: list[int]) -> Framed:
    splitter = WideLineSplitter(encoding, limit)
    out: Framed = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        lines = splitter.feed(data[start:cut])
        start = cut
        out += [(line, offset, end, i in lines.truncated) for i, (line, offset, end)
                in enumerate(zip(lines.data, lines.offsets, lines.ends, strict=True))]
    last = splitter.flush()
    if last is not None:
        out.append((last.data, last.offset, last.end, last.truncated))
    return out


def test_a_line_at_the_limit_with_crlf_cut_inside_the_newline_is_not_truncated() -> None:
    data = "\n\r\r\r\n".encode("utf-16-le")  # the second line is two CRs, then CRLF
    assert frame("utf-16-le", 4, data, [0, 9]) == frame("utf-16-le", 4, data, []) == [
        (b"", 0, 2, False), ("\r\r".encode("utf-16-le"), 2, 10, False)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["utf-16-le", "utf-16-be", "utf-32-le"]), st.integers(1, 10),
       st.lists(st.sampled_from(["a", "\r", "\n", "\u0a00", "\u0d00"]), max_size=30),
       st.lists(st.integers(0, 200), max_size=6))
def test_any_chunking_frames_the_same_lines(encoding: str, limit: int, text: list[str],
                                            cuts: list[int]) -> None:
    data = "".join(text).encode(encoding)
    cuts = [min(cut, len(data)) for cut in cuts]
    assert frame(encoding, limit, data, cuts) == frame(encoding, limit, data, [])
