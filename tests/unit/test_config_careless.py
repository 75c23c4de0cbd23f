"""Careless values for durations (issue 13 review): ones that would hang or spin the agent are
config errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent import config


def load(folder: Path, **main: object) -> config.AgentConfig:
    (folder / "conf.d").mkdir(exist_ok=True)
    (folder / "conf.d" / "s.yaml").write_text(yaml.safe_dump(
        {"name": "s", "paths": ["/var/log/app.log"], "schema": "$msg..."}))
    body: dict[str, object] = {"couchdb": {"url": "http://127.0.0.1:5984"}, "state_dir": "state"}
    for key, value in main.items():
        section = body.get(key)
        body[key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) \
            else value
    (folder / "agent.yaml").write_text(yaml.safe_dump(body))
    return config.load(folder / "agent.yaml")


@pytest.mark.parametrize(("main", "key"), [
    # aiohttp takes a timeout of 0 for none: a server that accepts and never answers held the
    # shipper's requests forever.
    ({"couchdb": {"request_timeout": "0s"}}, "couchdb.request_timeout"),
    # Retried at once, forever, against a server that is down.
    ({"shipping": {"retry_max_backoff": 0}}, "shipping.retry_max_backoff"),
    # A rescan loop with no pause.
    ({"scan_interval": "0ms"}, "scan_interval"),
    ({"poll_interval": 0}, "poll_interval"),
    # YAML's .nan passed `seconds < 0`; .inf is no duration either.
    ({"couchdb": {"request_timeout": float("nan")}}, "couchdb.request_timeout"),
    ({"shutdown_timeout": float("inf")}, "shutdown_timeout"),
])
def test_durations_that_would_hang_or_spin_are_config_errors(
        tmp_path: Path, main: dict[str, object], key: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        load(tmp_path, **main)
    assert key in str(caught.value)


def test_zero_stays_allowed_where_it_means_at_once(tmp_path: Path) -> None:
    loaded = load(tmp_path, shipping={"linger": 0}, shutdown_timeout="0s")
    assert loaded.shipping.linger == 0 and loaded.shutdown_timeout == 0
