"""Line framing without I/O: bytes read at an offset in, `RawLine`s out.

Only complete lines come out of `feed`; a trailing partial line waits for
its newline (or for `flush` when the file is finished). A CR before the LF
belongs to the line ending. A line longer than `max_line_bytes` keeps its
first bytes and is marked truncated; the rest is skipped as it arrives, so
memory stays bounded by the limit whatever the input.
"""

from __future__ import annotations

from itertools import accumulate, repeat
from operator import add

from agent.types import Lines, RawLine


class LineSplitter:
    __slots__ = ("_skipping", "_tail", "_tail_offset", "max_line_bytes", "position")

    def __init__(self, max_line_bytes: int, offset: int = 0) -> None:
        if max_line_bytes <= 0:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self.position = offset
        """Offset of the next byte to be fed."""
        self._tail = b""
        self._tail_offset = offset
        self._skipping = False
        """The buffered line is over the limit: `_tail` holds its kept prefix, the rest is dropped."""

    def feed(self, data: bytes) -> Lines:
        """Frame `data`, which continues the file at `self.position`.

        The lines after the first newline are framed by C code (split, accumulate, map), not a
        Python loop per line; only a chunk with a CR or an over-long line takes a second pass."""
        start_of_data = self.position
        self.position += len(data)
        first_nl = data.find(b"\n")
        if first_nl < 0:
            self._extend_tail(data)
            return Lines([], [], [])
        head_end = start_of_data + first_nl + 1
        if self._skipping:
            head, head_truncated = self._tail, True
            self._skipping = False
        else:
            head, head_truncated = self._cut(self._tail + data[:first_nl])
        parts = data[first_nl + 1:].split(b"\n")
        last = parts.pop()
        bounds = list(accumulate(map(add, map(len, parts), repeat(1)), initial=head_end))
        if b"\r" in data:
            parts = [part[:-1] if part.endswith(b"\r") else part for part in parts]
        limit = self.max_line_bytes
        truncated = {0} if head_truncated else set()
        if parts and max(map(len, parts)) > limit:
            for i, part in enumerate(parts):
                if len(part) > limit:
                    parts[i] = part[:limit]
                    truncated.add(i + 1)
        offsets = [self._tail_offset, *bounds]
        self._tail = b""
        self._tail_offset = bounds[-1]
        self._extend_tail(last)
        return Lines([head, *parts], offsets[:-1], offsets[1:], frozenset(truncated))

    def flush(self) -> RawLine | None:
        """Return the unterminated last line of a file that will not grow any more."""
        if self.position == self._tail_offset:
            return None
        if self._skipping:
            line = RawLine(self._tail_offset, self.position, self._tail, truncated=True)
        else:
            line = self._line(self._tail_offset, self.position, self._tail)
        self._tail = b""
        self._tail_offset = self.position
        self._skipping = False
        return line

    def _line(self, offset: int, end: int, data: bytes) -> RawLine:
        return RawLine(offset, end, *self._cut(data))

    def _cut(self, data: bytes) -> tuple[bytes, bool]:
        """A line's bytes without the CR of its line ending, cut to the limit; and if it was."""
        if data.endswith(b"\r"):
            data = data[:-1]
        if len(data) > self.max_line_bytes:
            return data[: self.max_line_bytes], True
        return data, False

    def _extend_tail(self, data: bytes) -> None:
        if self._skipping or not data:
            return
        self._tail += data
        # One byte of slack: a final CR is part of the line ending, not of the line.
        if len(self._tail) > self.max_line_bytes + 1:
            self._tail = self._tail[: self.max_line_bytes]
            self._skipping = True


class WideLineSplitter:
    """`LineSplitter` for UTF-16 and UTF-32: the newline is a whole code unit, found only at
    file offsets aligned to the unit size (so U+0A00's bytes are never taken for a newline)."""

    __slots__ = ("_buffer", "_buffer_offset", "_kept", "_line_start", "cr", "max_line_bytes",
                 "newline", "position", "unit")

    def __init__(self, encoding: str, max_line_bytes: int, offset: int = 0) -> None:
        self.unit = 4 if encoding.startswith("utf-32") else 2
        self.newline = "\n".encode(encoding)
        self.cr = "\r".encode(encoding)
        self.max_line_bytes = max(self.unit, max_line_bytes - max_line_bytes % self.unit)
        self.position = offset
        self._buffer = b""
        self._buffer_offset = offset
        self._line_start = offset
        self._kept: bytes | None = None
        """The prefix of an over-long line whose rest is being skipped."""

    def feed(self, data: bytes) -> Lines:
        self.position += len(data)
        buffer = self._buffer + data
        lines: list[RawLine] = []
        start = search = 0
        while (found := buffer.find(self.newline, search)) >= 0:
            if (self._buffer_offset + found) % self.unit:
                search = found + 1
                continue
            end = found + len(self.newline)
            lines.append(self._line(self._buffer_offset + end, buffer[start:found]))
            start = search = end
        rest = buffer[start:]
        offset = self._buffer_offset + start
        # Only whole code units count: a chunk may end inside the newline that ends the line.
        if self._kept is None and len(rest) - len(rest) % self.unit > self.max_line_bytes + len(self.cr):
            self._kept = rest[: self.max_line_bytes]
        if self._kept is not None:
            # Skip what cannot be part of a newline yet; stay aligned to the code unit.
            drop = max(0, len(rest) - len(self.newline)) // self.unit * self.unit
            rest, offset = rest[drop:], offset + drop
        self._buffer, self._buffer_offset = rest, offset
        return Lines.of(lines)

    def flush(self) -> RawLine | None:
        if self.position == self._line_start:
            return None
        line = self._line(self.position, self._buffer)
        self._buffer, self._buffer_offset = b"", self.position
        return line

    def _line(self, end: int, data: bytes) -> RawLine:
        offset, self._line_start = self._line_start, end
        if self._kept is not None:
            kept, self._kept = self._kept, None
            return RawLine(offset, end, kept, truncated=True)
        if data.endswith(self.cr) and len(data) % self.unit == 0:
            data = data[: -len(self.cr)]
        if len(data) > self.max_line_bytes:
            return RawLine(offset, end, data[: self.max_line_bytes], truncated=True)
        return RawLine(offset, end, data)


Splitter = LineSplitter | WideLineSplitter


def splitter_for(encoding: str, max_line_bytes: int, offset: int = 0) -> Splitter:
    """The line splitter for files in `encoding` (a normalized Python codec name)."""
    if encoding.startswith(("utf-16", "utf-32")):
        return WideLineSplitter(encoding, max_line_bytes, offset)
    return LineSplitter(max_line_bytes, offset)
