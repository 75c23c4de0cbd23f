"""The shipper's health and route: pure transitions, driven without I/O or a clock."""

from __future__ import annotations

import pytest

from agent.health import TRANSITIONS, Event, Health, HealthState, backoff


def test_every_state_has_a_transition_for_every_event() -> None:
    assert set(TRANSITIONS) == {(h, e) for h in Health for e in Event}


def test_answers_and_failures_move_the_health() -> None:
    state = HealthState(targets=1)
    assert state.health is Health.OK and state.sending
    down = state.failed(0).failed(0)
    assert down.health is Health.DOWN and not down.sending and down.failures == 2
    retrying = down.on(Event.RETRIED)
    assert retrying.health is Health.RETRYING and retrying.sending and retrying.failures == 0
    assert retrying.on(Event.RETRIED).health is Health.RETRYING
    assert retrying.on(Event.SETTLED).health is Health.OK
    assert retrying.failed(0).health is Health.DOWN
    with pytest.raises(ValueError):
        state.on(Event.FAILED)


def test_a_failure_moves_to_the_next_url_once_and_only_a_probe_moves_back() -> None:
    state = HealthState(targets=3)
    over = state.failed(0)
    assert over.target == 1
    # A second send that failed on the first URL meanwhile does not move it again.
    assert over.failed(0).target == 1
    assert over.failed(1).target == 2 and over.failed(1).failed(2).target == 0
    # Answers on the second URL keep it there: only the probe of the first moves back.
    assert over.on(Event.SETTLED).target == 1
    assert over.on(Event.SETTLED).failed_back() == HealthState(Health.OK, 0, 3, 0)
    assert HealthState(targets=1).failed(0).target == 0


def test_backoff_grows_is_capped_and_jittered_over_its_upper_half() -> None:
    assert backoff(1, 30, 0.0) == pytest.approx(0.1)
    assert backoff(1, 30, 0.999) < 0.2
    assert backoff(3, 30, 0.0) == pytest.approx(0.4)
    assert backoff(50, 30, 0.0) == pytest.approx(15) and backoff(50, 30, 0.9999) <= 30
