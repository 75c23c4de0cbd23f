"""A shipper's health and route, as one value with pure transitions (no I/O, no clock).

`Health` says what the shipper can do: OK (CouchDB takes documents),
RETRYING (it answers, but some documents got an error that may pass: they
are sent again with backoff, so status is DEGRADED), DOWN (requests fail:
batches go to the spool and CouchDB is probed with backoff). Every
transition is in `TRANSITIONS`, driven by what a request got (`Event`).

`target` is the URL in use. A request that fails on it moves to the next
one (failover); only a probe of the first URL that answers moves back
(failback), never a send that might fail again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Health(enum.Enum):
    OK = "ok"
    RETRYING = "retrying"
    DOWN = "down"


class Event(enum.Enum):
    SETTLED = "settled"
    """A request was answered and no document waits for a retry."""
    RETRIED = "retried"
    """A request was answered and some documents wait for a retry."""
    FAILED = "failed"
    """A request got no usable answer."""


TRANSITIONS: dict[tuple[Health, Event], Health] = {
    (Health.OK, Event.SETTLED): Health.OK,
    (Health.OK, Event.RETRIED): Health.RETRYING,
    (Health.OK, Event.FAILED): Health.DOWN,
    (Health.RETRYING, Event.SETTLED): Health.OK,
    (Health.RETRYING, Event.RETRIED): Health.RETRYING,
    (Health.RETRYING, Event.FAILED): Health.DOWN,
    (Health.DOWN, Event.SETTLED): Health.OK,
    (Health.DOWN, Event.RETRIED): Health.RETRYING,
    (Health.DOWN, Event.FAILED): Health.DOWN,
}


@dataclass(frozen=True, slots=True)
class HealthState:
    health: Health = Health.OK
    target: int = 0
    """Index of the URL in use."""
    targets: int = 1
    failures: int = 0
    """Requests failed in a row (the backoff grows with them)."""

    @property
    def sending(self) -> bool:
        """Whether batches go to CouchDB (else to the spool, while CouchDB is probed)."""
        return self.health is not Health.DOWN

    def on(self, event: Event) -> HealthState:
        """The state after a request was answered (SETTLED, RETRIED) or not (use `failed`)."""
        if event is Event.FAILED:
            raise ValueError("a failure names its URL: use failed(target)")
        return replace(self, health=TRANSITIONS[self.health, event], failures=0)

    def failed(self, target: int) -> HealthState:
        """A request to URL `target` failed: move to the next URL if that is the one in use
        (two sends in flight failing on one URL fail over once, not back and forth)."""
        nxt = (self.target + 1) % self.targets if target == self.target else self.target
        return replace(self, health=TRANSITIONS[self.health, Event.FAILED], target=nxt,
                       failures=self.failures + 1)

    def failed_back(self) -> HealthState:
        """A probe of the first URL was answered: send there again."""
        return replace(self, target=0)


def backoff(failures: int, ceiling: float, draw: float) -> float:
    """Seconds to wait after `failures` in a row: exponential from 0.1 s, capped at `ceiling`,
    jittered over its upper half by `draw` (uniform in [0, 1))."""
    top = min(ceiling, 0.1 * 2.0 ** min(failures, 20))
    return top / 2 + draw * top / 2
