"""Failures and their backoff, without I/O."""

from __future__ import annotations

from agent.supervisor import FIRST_RETRY, MAX_RETRY, Failures, describe


def test_backoff_doubles_per_failure_in_a_row_up_to_the_cap_and_resets_on_recovery() -> None:
    failures = Failures()
    key = ("file", "app", "/var/log/app.log")
    delays = [failures.failed(key, "OSError: [Errno 5]", 100.0 + n).retry_at - (100.0 + n)
              for n in range(9)]
    assert delays == [FIRST_RETRY * 2 ** n for n in range(6)] + [MAX_RETRY] * 3
    assert failures.current[key].since == 100.0 and failures.current[key].count == 9
    assert key in failures and len(failures) == 1
    last = failures.recovered(key)
    assert last is not None and last.count == 9 and key not in failures
    assert failures.failed(key, "again", 500.0).retry_at == 500.0 + FIRST_RETRY
    assert failures.recovered(("shipper", "logs")) is None


def test_describe_names_the_error_type() -> None:
    assert describe(KeyError("a/1.2.x")) == "KeyError: 'a/1.2.x'"
    assert describe(OSError(5, "Input/output error")) == "OSError: [Errno 5] Input/output error"
    assert describe(RuntimeError()) == "RuntimeError"
