"""The per-file follow state machine, without I/O: observations in, (state, action) out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.follow import (
    TRANSITIONS,
    Action,
    FollowError,
    FollowState,
    Observation,
    Seen,
    observe,
    reconcile,
)

S = FollowState


def seen(size: int = 100, nlink: int = 1, position: int = 100, marker_ok: bool = True,
         listed: bool = True, idle: bool = False) -> Seen:
    return Seen(size, nlink, position, marker_ok, listed, idle)


def test_a_followed_file_is_read_as_it_grows() -> None:
    assert reconcile(S.ACTIVE, seen(size=150)) == (S.ACTIVE, Action.READ)
    assert reconcile(S.ACTIVE, seen()) == (S.ACTIVE, Action.READ)


@pytest.mark.parametrize("state", [S.ACTIVE, S.ROTATED_DRAINING, S.DELETED_DRAINING])
def test_truncation_is_back_to_active_at_zero(state: FollowState) -> None:
    nlink = 0 if state is S.DELETED_DRAINING else 1
    assert reconcile(state, seen(size=10, nlink=nlink)) == (S.ACTIVE, Action.RESTART)
    # Regrown past the read position at once: only the marker can tell.
    assert reconcile(state, seen(size=500, nlink=nlink, marker_ok=False)) == (S.ACTIVE,
                                                                              Action.RESTART)


def test_rotation_reads_to_the_end_then_releases_after_rotate_wait() -> None:
    state, action = reconcile(S.ACTIVE, seen(size=300, listed=False))
    assert (state, action) == (S.ROTATED_DRAINING, Action.READ)
    # Read to its end, but not idle for rotate_wait yet: a late writer may still append.
    assert reconcile(state, seen(listed=False)) == (S.ROTATED_DRAINING, Action.READ)
    # Idle, but bytes still unread: read them first.
    assert reconcile(state, seen(size=120, listed=False, idle=True)) == (S.ROTATED_DRAINING,
                                                                         Action.READ)
    assert reconcile(state, seen(listed=False, idle=True)) == (S.RELEASED, Action.RELEASE)


def test_a_rotated_file_found_in_the_globs_again_is_active() -> None:
    assert reconcile(S.ROTATED_DRAINING, seen(listed=True)) == (S.ACTIVE, Action.READ)


def test_deletion_reads_the_rest_then_releases_at_once() -> None:
    state, action = reconcile(S.ACTIVE, seen(size=200, nlink=0, listed=False))
    assert (state, action) == (S.DELETED_DRAINING, Action.READ)
    assert reconcile(state, seen(nlink=0, listed=False)) == (S.RELEASED, Action.RELEASE)
    assert reconcile(S.ROTATED_DRAINING, seen(size=200, nlink=0, listed=False)) == (
        S.DELETED_DRAINING, Action.READ)
    # Deleted and already read to its end: released without waiting for a scan.
    assert reconcile(S.ACTIVE, seen(nlink=0)) == (S.RELEASED, Action.RELEASE)


def test_observations_that_cannot_happen_are_bugs() -> None:
    with pytest.raises(FollowError):
        reconcile(S.RELEASED, seen())
    # A file without a name is never found by a scan again.
    assert (S.DELETED_DRAINING, Observation.FOLLOWED) not in TRANSITIONS
    assert (S.DELETED_DRAINING, Observation.LEFT) not in TRANSITIONS


def test_changed_bytes_come_before_where_the_file_is() -> None:
    assert observe(seen(size=10, nlink=0, listed=False, idle=True)) is Observation.TRUNCATED
    assert observe(seen(nlink=0, listed=True)) is Observation.DRAINED


def test_every_state_but_released_has_a_way_out() -> None:
    for state in (S.ACTIVE, S.ROTATED_DRAINING, S.DELETED_DRAINING):
        assert TRANSITIONS[(state, Observation.DRAINED)] is S.RELEASED
        assert TRANSITIONS[(state, Observation.TRUNCATED)] is S.ACTIVE
    assert not [key for key in TRANSITIONS if key[0] is S.RELEASED]


def test_an_observation_is_validated() -> None:
    with pytest.raises(ValueError):
        seen(size=-1)


@given(st.sampled_from([S.ACTIVE, S.ROTATED_DRAINING]),
       st.builds(Seen, st.integers(0, 300), st.integers(0, 2), st.integers(0, 300), st.booleans(),
                 st.booleans(), st.booleans()))
def test_any_observation_of_a_named_file_has_one_meaning(state: FollowState, seen: Seen) -> None:
    after, action = reconcile(state, seen)
    truncated = seen.size < seen.position or not seen.marker_ok
    unread = seen.size > seen.position
    assert (action is Action.RESTART) == truncated
    assert (after is S.RELEASED) == (action is Action.RELEASE)
    if action is Action.RELEASE:
        # Never released with bytes still unread, nor while the globs still match it.
        assert not unread and (seen.nlink == 0 or (not seen.listed and seen.idle))
    if not truncated and seen.nlink > 0:
        assert (after is S.ACTIVE) == seen.listed or after is S.RELEASED
