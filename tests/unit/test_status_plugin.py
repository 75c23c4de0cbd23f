"""`agent status` as a monitoring plugin: the level of each snapshot (pure `assess`), the first
line and its performance data, the URLs with their states and errors' ages, and the thresholds
read from the `status:` section of the main config."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli
from agent.config import ConfigError, StatusConfig, load
from agent.status import (
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    Level,
    assess,
    mismatch,
    render,
    settings_of,
)
from tests.agentproc import write_config
from tests.unit import test_watcher_status
from tests.unit.snapshots import JSON, damage, paths

NOW = 1_800_000_000.0
"""A fixed clock, so no case depends on when the test runs (collection may be long before)."""
LIMITS = StatusConfig(critical_after=300.0, lag_warning=1024**2, dead_letter_window=3600.0)
PERFDATA = re.compile(r"[a-z_]+=\d+(B|s|c)?;\d*;\d*;\d*;\d*")


def snapshot(**database: Any) -> dict[str, Any]:
    """A snapshot of this (live) process, written at NOW, by an agent started 100 s before."""
    snap = test_watcher_status.snapshot(**{"last_success": NOW, **database})
    snap["updated_at"], snap["started_at"] = NOW, NOW - 100
    return snap


def levels(snap: dict[str, Any], dead_letter_at: float | None = None) -> list[Level]:
    return [f.level for f in assess(snap, NOW, LIMITS, dead_letter_at)]


def url(address: str, in_use: bool, state: str = "up", down_since: float | None = None,
        last_error: str | None = None, last_error_at: float | None = None) -> dict[str, Any]:
    return {"url": address, "in_use": in_use, "state": state, "down_since": down_since,
            "last_error": last_error, "last_error_at": last_error_at}


def test_a_healthy_snapshot_is_ok() -> None:
    assert levels(snapshot()) == []
    assert render(snapshot(), Path("/s"), now=NOW, limits=LIMITS)[1] == EXIT_OK


@pytest.mark.parametrize(("database", "level"), [
    # Older snapshots: no down_since, so down since the last success (or the start).
    ({"healthy": False, "last_error": "unreachable: refused", "last_success": NOW - 10},
     Level.WARNING),
    ({"healthy": False, "last_error": "unreachable: refused", "last_success": NOW - 301},
     Level.CRITICAL),
    ({"healthy": False, "last_error": "unreachable: refused", "last_success": None},
     Level.WARNING),  # started 100 s ago
    # The shipper's down_since wins over `healthy` and `last_success`.
    ({"healthy": False, "last_success": NOW - 9999, "down_since": NOW - 60}, Level.WARNING),
    ({"healthy": True, "down_since": NOW - 600}, Level.CRITICAL),
    ({"healthy": False, "down_since": None}, None),
    ({"backpressure": True, "spool_records": 9}, Level.CRITICAL),
    # The shipper leaves the flag set when what it held went straight to CouchDB.
    ({"backpressure": True, "spool_records": 0}, Level.CRITICAL),  # an unwritable spool
    ({"spool": {"dropped_records": 3}}, Level.WARNING),
    ({"dead_lettered": 2, "last_dead_letter_at": NOW - 60}, Level.CRITICAL),
    ({"dead_lettered": 2, "last_dead_letter_at": NOW - 3700}, None),
    ({"dead_lettered": 2}, Level.WARNING),  # refused, but when is not known
    ({"urls": [url("http://a:5984", True), url("http://b:5984", False)]}, None),
    ({"urls": [url("http://a:5984", False, "down", NOW - 30, "unreachable: x", NOW - 5),
               url("http://b:5984", True)]}, Level.WARNING),  # failed over
    ({"urls": [url("http://a:5984", True), url("http://b:5984", False, "down", NOW - 30)]},
     Level.WARNING),  # a node of the cluster down
    # An old error of a URL that is up again is history, not a problem.
    ({"urls": [url("http://a:5984", True, "up", None, "unreachable: x", NOW - 7200)]}, None),
])
def test_the_level_of_a_database(database: dict[str, Any], level: Level | None) -> None:
    found = levels(snapshot(**database))
    assert (found[0] if found else None) == level, found


def test_dead_letters_before_a_restart_count_from_the_dead_letter_file() -> None:
    assert levels(snapshot(), dead_letter_at=NOW - 60) == [Level.CRITICAL]
    assert levels(snapshot(), dead_letter_at=NOW - 3601) == []
    assert levels(snapshot(dead_lettered=4), dead_letter_at=NOW - 60) == [Level.CRITICAL]
    assert levels(snapshot(dead_lettered=4), dead_letter_at=NOW - 3601) == []


def test_lag_over_the_threshold_and_a_failing_file_are_warnings() -> None:
    snap = snapshot()
    snap["sources"]["app"]["lag"] = 2 * 1024**2
    assert levels(snap) == [Level.WARNING]
    snap = snapshot()
    snap["sources"]["app"]["failing"] = [{"path": "/var/log/x.log", "error": "EACCES",
                                          "since": NOW - 90}]
    text, code = render(snap, Path("/s"), now=NOW, limits=LIMITS)
    assert code == EXIT_WARNING
    assert "app: cannot read /var/log/x.log for 90s: EACCES" in text.splitlines()[0]


def test_the_worst_finding_sets_the_level() -> None:
    snap = snapshot(backpressure=True, spool_records=9, spool={"dropped_records": 1}, healthy=False,
                    last_success=NOW - 5)
    assert levels(snap) == [Level.CRITICAL, Level.WARNING, Level.WARNING]
    text, code = render(snap, Path("/s"), now=NOW, limits=LIMITS)
    assert code == EXIT_CRITICAL
    first = text.splitlines()[0]
    assert first.startswith("COUCHLOG CRITICAL - log_app: spool full, reading paused (+2 more); "
                            "1 files, "), first


def test_the_first_line_and_its_performance_data() -> None:
    snap = snapshot(spool_records=7, spool_bytes=3000, queued=2, stored=40, conflicts=1,
                    healthy=False, last_success=NOW - 30, last_error="server_error: a|b\nc")
    text, code = render(snap, Path("/s"), now=NOW, limits=LIMITS)
    first, *_ = text.splitlines()
    summary, _, perf = first.partition(" | ")
    assert code == EXIT_WARNING
    assert summary == ("COUCHLOG WARNING - log_app: server_error: a/b c (CouchDB not reachable "
                       "for 30s, retrying); 1 files, 2.0 KiB behind, spool 2.9 KiB (7 document(s))")
    items = perf.split(" ")
    assert all(PERFDATA.fullmatch(i) for i in items), items
    assert items[:7] == ["files=1;;;0;", "lag_bytes=2048B;1048576;;0;", "spool_bytes=3000B;;;0;",
                         "spooled=7;;;0;", "queued=2;;;0;", "down_seconds=30s;;300;0;",
                         "stored=40c;;;0;"]


def test_an_ok_first_line() -> None:
    text, code = render(snapshot(), Path("/s"), now=NOW, limits=LIMITS)
    assert code == EXIT_OK
    assert text.splitlines()[0].startswith(
        "COUCHLOG OK - 1 files, 2.0 KiB behind, spool empty | files=1;;;0; lag_bytes=2048B;")
    assert "health: OK" in text.splitlines()


def test_each_url_is_shown_with_its_state_and_an_old_error_with_its_age() -> None:
    snap = snapshot(urls=[url("http://a:5984", False, "down", NOW - 600, "unreachable: refused",
                              NOW - 3),
                          url("http://b:5984", True, "up", None, "server_error: HTTP 500",
                              NOW - 7200)],
                    last_error="server_error: HTTP 500")
    text, code = render(snap, Path("/s"), now=NOW, limits=LIMITS)
    assert code == EXIT_WARNING
    down = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(NOW - 600))
    assert (f"    http://a:5984: standby, down since {down} (10m); last error 3s ago: "
            "unreachable: refused") in text.splitlines()
    assert ("    http://b:5984: in use, up; last error 2.0h ago: server_error: HTTP 500"
            in text.splitlines())
    assert "failed over to http://b:5984" in text.splitlines()[0]


def test_while_a_database_is_down_its_urls_add_no_findings() -> None:
    snap = snapshot(down_since=NOW - 60, last_error="unreachable: x",
                    urls=[url("http://a:5984", False, "down", NOW - 60, "unreachable: x", NOW - 1),
                          url("http://b:5984", True, "down", NOW - 30, "unreachable: y", NOW)])
    assert [f.text for f in assess(snap, NOW, LIMITS)] == [
        "log_app: unreachable: x (CouchDB not reachable for 60s, retrying)"]
    text = render(snap, Path("/s"), now=NOW, limits=LIMITS)[0]
    assert "    http://b:5984: in use, down since " in text and "last error 0s ago: unreachable: y" in text


def test_an_old_database_error_is_never_shown_as_current() -> None:
    text, code = render(snapshot(last_error="unreachable: refused"), Path("/s"), now=NOW,
                        limits=LIMITS)
    assert code == EXIT_OK
    assert "    earlier error (documents stored since): unreachable: refused" in text.splitlines()
    assert "CouchDB not reachable" not in text


def test_a_snapshot_with_malformed_new_fields_is_unknown() -> None:
    for bad in ({"urls": [{"url": "http://a", "in_use": True}]}, {"down_since": "soon"},
                {"urls": [url("http://a", True, "sideways")]}):
        text, code = render(snapshot(**bad), Path("/s"), now=NOW, limits=LIMITS)
        assert code == EXIT_UNKNOWN and text.startswith("COUCHLOG UNKNOWN - "), text


def test_the_status_section_has_defaults_and_is_checked(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", [{"name": "app", "paths": ["x.log"],
                                                           "schema": "$msg..."}])
    assert settings_of(config)[1] == StatusConfig(300.0, 64 * 1024**2, 3600.0)
    assert load(config).status == StatusConfig()
    config = write_config(tmp_path, "http://127.0.0.1:9", [],
                          status={"critical_after": "30s", "lag_warning": "1MiB",
                                  "dead_letter_window": "10m"})
    assert settings_of(config)[1] == StatusConfig(30.0, 1024**2, 600.0)
    config = write_config(tmp_path, "http://127.0.0.1:9", [],
                          status={"critical_after": "soon", "lag_warnings": 1})
    with pytest.raises(ConfigError) as raised:
        settings_of(config)
    assert {p.key for p in raised.value.problems} == {"status.critical_after",
                                                      "status.lag_warnings"}


def test_a_config_status_cannot_read_is_unknown_not_critical(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", [], status={"critical_after": "soon"})
    assert cli.main(["status", "-c", str(config)]) == EXIT_UNKNOWN
    out = capsys.readouterr().out
    assert out.startswith("COUCHLOG UNKNOWN - config error: ") and "status.critical_after" in out


def full_snapshot() -> dict[str, Any]:
    """A snapshot with every optional field the shipper and the daemon may add."""
    snap = snapshot(down_since=None, last_dead_letter_at=NOW - 10, dead_lettered=1,
                    urls=[url("http://a:5984", False, "down", NOW - 60, "unreachable: x", NOW),
                          url("http://b:5984", True, "up", None, None, None)])
    snap["sources"]["app"]["failing"] = [{"path": "/x", "error": "EIO", "since": NOW - 5}]
    return snap


FULL_PLACES = list(paths(full_snapshot()))[1:]


@settings(max_examples=300, deadline=None)
@given(place=st.sampled_from(FULL_PLACES), value=JSON | st.just(KeyError),
       now=st.floats(0, 1e11))
def test_render_survives_any_part_of_the_new_fields_replaced(place: tuple[Any, ...], value: Any,
                                                            now: float) -> None:
    damaged = damage(full_snapshot(), place, value)
    text, code = render(damaged, Path("/s/status.json"), now=now, limits=LIMITS,
                        dead_letter_at=now - 1)
    assert isinstance(text, str) and code in (0, 1, 2, 3)
    assert "\n" not in text.splitlines()[0] and text.splitlines()[0].count(" | ") <= 1
    if mismatch(damaged) is not None:
        assert code == EXIT_UNKNOWN and "is not a status snapshot" in text
