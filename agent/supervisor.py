"""Which parts of the agent are failing now, and when each is tried again. No I/O.

One file's failure is that file's problem: a tailer or shipper that raises is
logged, recorded here and retried after a backoff that doubles with each
failure in a row, while everything else keeps going. The record stays until
the part is seen working again, so `agent status` can say DEGRADED meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_RETRY = 1.0
"""Seconds before the first retry of a failed part."""
MAX_RETRY = 60.0
"""The backoff stops doubling here: a file on a dead NFS mount is tried once a minute."""

Part = tuple[str, ...]
"""What failed: ("file", source, path), ("shipper", database) or ("watcher",)."""


@dataclass(slots=True)
class Failure:
    """One part failing: since when, how often in a row, the last error, its next retry."""

    error: str
    count: int
    since: float
    retry_at: float
    position: int = 0
    """How far the failed part had got (a tailer's read offset): working past it is recovery."""
    holder: object = None
    """The object that failed (a tailer), to tell it from the one that takes over."""

    def as_dict(self) -> dict[str, object]:
        return {"error": self.error, "failures": self.count, "since": self.since,
                "retry_at": self.retry_at}


def describe(exc: BaseException) -> str:
    """An error as one line: its type and message (an OSError's message has errno and file)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Failures:
    """The parts failing now, each with its last failure."""

    def __init__(self) -> None:
        self.current: dict[Part, Failure] = {}

    def failed(self, part: Part, error: str, now: float, position: int = 0,
               holder: object = None) -> Failure:
        """Record a failure; the returned record says when to retry."""
        last = self.current.get(part)
        count = 1 if last is None else last.count + 1
        delay = min(FIRST_RETRY * 2 ** (count - 1), MAX_RETRY)
        failure = Failure(error, count, now if last is None else last.since, now + delay,
                          position, holder)
        self.current[part] = failure
        return failure

    def recovered(self, part: Part) -> Failure | None:
        """The part works again: forget its failures and return the last one, if any."""
        return self.current.pop(part, None)

    def __contains__(self, part: object) -> bool:
        return part in self.current

    def __len__(self) -> int:
        return len(self.current)
