"""The life of one followed file, without I/O: its follow state and the one place that decides
what an observation of the file means (`reconcile`).

A tailer observes its open file (fstat, whether the bytes before its read
position are still the ones it read, whether the last scan found the file at
a path its source's globs match) and asks `reconcile` what that means:

- the file shrank below the read position, or the bytes before it changed:
  it was truncated (copy-truncate) or rewritten, and is read again from 0;
- it has no name left (`st_nlink == 0`): it was deleted, and is read to its
  end and then released, so its disk space is freed at once;
- it has a name, but none the globs match: it was rotated away, and is read
  to its end, then released once it has not grown for `rotate_wait`;
- otherwise it is followed as it grows.

All the states and transitions are in `TRANSITIONS`; an observation that is
not allowed in the current state is a bug (`FollowError`), never a silent
fallback.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FollowState(enum.Enum):
    ACTIVE = "active"
    """At a path the globs match: read as it grows."""
    ROTATED_DRAINING = "rotated_draining"
    """Renamed out of the globs: read to its end, released after `rotate_wait` without growth."""
    DELETED_DRAINING = "deleted_draining"
    """Deleted: read to its end, then released at once."""
    RELEASED = "released"
    """Done: the descriptor is closed and the offsets are let go of."""


class Observation(enum.Enum):
    FOLLOWED = "followed"
    """At a path the globs match."""
    LEFT = "left"
    """Has a name, but none the globs match (rotated away)."""
    DELETED = "deleted"
    """Has no name left, bytes still unread."""
    DRAINED = "drained"
    """Deleted, or rotated away and idle for `rotate_wait`, with nothing left to read."""
    TRUNCATED = "truncated"
    """Shorter than the read position, or the bytes before it changed."""


class Action(enum.Enum):
    READ = "read"
    """Read what was appended (maybe nothing)."""
    RESTART = "restart"
    """Hand on what is pending, let go of the offsets, and read again from offset 0."""
    RELEASE = "release"
    """Hand on what is pending (the unterminated last line too), then close the file."""


class FollowError(RuntimeError):
    """An observation that cannot happen in this state: a bug in the agent."""


_S, _O = FollowState, Observation
TRANSITIONS: dict[tuple[FollowState, Observation], FollowState] = {
    (_S.ACTIVE, _O.FOLLOWED): _S.ACTIVE,
    (_S.ACTIVE, _O.LEFT): _S.ROTATED_DRAINING,
    (_S.ACTIVE, _O.DELETED): _S.DELETED_DRAINING,
    (_S.ACTIVE, _O.DRAINED): _S.RELEASED,
    (_S.ACTIVE, _O.TRUNCATED): _S.ACTIVE,
    (_S.ROTATED_DRAINING, _O.FOLLOWED): _S.ACTIVE,
    (_S.ROTATED_DRAINING, _O.LEFT): _S.ROTATED_DRAINING,
    (_S.ROTATED_DRAINING, _O.DELETED): _S.DELETED_DRAINING,
    (_S.ROTATED_DRAINING, _O.DRAINED): _S.RELEASED,
    (_S.ROTATED_DRAINING, _O.TRUNCATED): _S.ACTIVE,
    # A file without a name never gets one back (linkat needs O_TMPFILE), so it is never
    # found by a scan again: FOLLOWED and LEFT cannot be observed.
    (_S.DELETED_DRAINING, _O.DELETED): _S.DELETED_DRAINING,
    (_S.DELETED_DRAINING, _O.DRAINED): _S.RELEASED,
    (_S.DELETED_DRAINING, _O.TRUNCATED): _S.ACTIVE,
}
ACTIONS: dict[Observation, Action] = {
    _O.FOLLOWED: Action.READ, _O.LEFT: Action.READ, _O.DELETED: Action.READ,
    _O.DRAINED: Action.RELEASE, _O.TRUNCATED: Action.RESTART,
}


@dataclass(frozen=True, slots=True)
class Seen:
    """What the tailer observed of its open file."""

    size: int
    """st_size of the open descriptor."""
    nlink: int
    """st_nlink: 0 once the file was deleted."""
    position: int
    """How far the tailer has read (for a file with no identity yet, its size: what it holds
    cannot be read before its first line is complete)."""
    marker_ok: bool
    """Whether the bytes before `position` are still the ones read."""
    listed: bool
    """Whether the last scan found the file at a path the globs match."""
    idle: bool
    """Whether the file has not grown for `rotate_wait`."""

    def __post_init__(self) -> None:
        if self.size < 0 or self.nlink < 0 or self.position < 0:
            raise ValueError(f"invalid observation {self!r}")


def observe(seen: Seen) -> Observation:
    """What an observation means, in this order: changed bytes first, then where the file is."""
    if seen.size < seen.position or not seen.marker_ok:
        return Observation.TRUNCATED
    unread = seen.size > seen.position
    if seen.nlink == 0:
        return Observation.DELETED if unread else Observation.DRAINED
    if seen.listed:
        return Observation.FOLLOWED
    return Observation.DRAINED if seen.idle and not unread else Observation.LEFT


def reconcile(state: FollowState, seen: Seen) -> tuple[FollowState, Action]:
    """The next state and what to do, for an observation of the file in `state`."""
    observation = observe(seen)
    after = TRANSITIONS.get((state, observation))
    if after is None:
        raise FollowError(f"{observation.value} observed in state {state.value}: {seen!r}")
    return after, ACTIONS[observation]


def draining(state: FollowState) -> bool:
    """Whether the file is being read to its end before release (it waits `rotate_wait` at
    most between observations)."""
    return state in (FollowState.ROTATED_DRAINING, FollowState.DELETED_DRAINING)
