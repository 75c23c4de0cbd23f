"""The `metrics.listen` and `fleet.interval` keys, and `agent report fleet`'s rows (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.report import fleet_rows, render_fleet
from tests.unit.test_config import problems, write


def test_metrics_and_fleet_keys_default_and_parse(tmp_path: Path) -> None:
    default = config.load(write(tmp_path))
    assert default.metrics.listen is None and default.fleet.interval == 60.0
    given = config.load(write(tmp_path, {"couchdb": {"url": "http://127.0.0.1:5984"},
                                         "metrics": {"listen": "[::1]:9464"},
                                         "fleet": {"interval": "0"}}))
    assert given.metrics.listen == ("::1", 9464) and given.fleet.interval == 0.0


@pytest.mark.parametrize("listen", ["9464", "localhost", "host:port", "127.0.0.1:70000", 9464])
def test_a_bad_metrics_address_names_the_key(tmp_path: Path, listen: object) -> None:
    found = problems(write(tmp_path, {"couchdb": {"url": "http://127.0.0.1:5984"},
                                      "metrics": {"listen": listen}}))
    assert len(found) == 1 and "metrics.listen" in found[0]


def test_fleet_rows_flag_hosts_quiet_for_three_intervals() -> None:
    now = 10_000.0
    docs = [{"host": "b", "updated_at": now - 30, "health": "OK", "bytes_behind": 0,
             "event": "tick"},
            {"host": "a", "updated_at": now - 181, "health": "WARNING", "bytes_behind": 7,
             "event": "tick"},
            {"host": "c", "updated_at": now - 10, "health": "OK", "event": "stop"}]
    rows = fleet_rows(docs, now, interval=60)
    assert [r["host"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["flag"].startswith("NOT SEEN") and rows[0]["lag_bytes"] == 7
    assert rows[1]["flag"] == "" and rows[2]["flag"] == "stopped"
    table = render_fleet(rows, "table").splitlines()
    assert table[0].startswith("HOST") and table[1].startswith("a ") and "3m ago" in table[1]
    assert render_fleet(rows, "csv").splitlines()[1].startswith("a,")
