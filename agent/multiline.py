"""Multi-line events without I/O: lines in, events out (a Java stack trace is one event).

A line matching `start` opens a new event; any other line is appended to
the current one, joined with a newline. An event spans from its first
line's offset to its last line's end, so offsets stay in step with the
file. Lines before the first start line form an event of their own. The
caller flushes the last event after a timeout, and before the file ends
or is truncated, so events never span files. An event larger than
`max_bytes` keeps its first bytes and is marked truncated.
"""

from __future__ import annotations

from agent.patterns import Pattern, PatternTimeout
from agent.types import Lines, RawLine


class MultilineAssembler:
    def __init__(self, start: Pattern, max_bytes: int, encoding: str = "utf-8") -> None:
        self.start = start
        self.max_bytes = max_bytes
        self.encoding = encoding
        self.joiner = "\n".encode(encoding)
        self._parts: list[bytes] = []
        self._size = 0
        self._offset = 0
        self._end = 0
        self._truncated = False

    @property
    def pending(self) -> bool:
        return bool(self._parts)

    def feed(self, lines: Lines) -> Lines:
        events = []
        for line in lines:
            if self._parts and self._starts_event(line.data):
                events.append(self._emit())
            self._append(line)
        return Lines.of(events)

    def flush(self) -> RawLine | None:
        return self._emit() if self._parts else None

    def _starts_event(self, data: bytes) -> bool:
        try:
            return self.start.search(data.decode(self.encoding, errors="replace")) is not None
        except PatternTimeout:
            # A line the start pattern cannot judge in time opens an event: events may be cut
            # there, but no line is lost or held.
            return True

    def _append(self, line: RawLine) -> None:
        if not self._parts:
            self._offset = line.offset
        self._end = line.end
        self._truncated |= line.truncated
        data = line.data if not self._parts else self.joiner + line.data
        room = self.max_bytes - self._size
        if len(data) > room:
            data = data[: max(room, 0)]
            self._truncated = True
        if data or not self._parts:
            self._parts.append(data)
            self._size += len(data)

    def _emit(self) -> RawLine:
        event = RawLine(self._offset, self._end, b"".join(self._parts), self._truncated)
        self._parts = []
        self._size = 0
        self._truncated = False
        return event
