"""Reload: the pure plan (what is added, removed, changed, or waits for a restart), its checks,
and how `agent status` shows the last reload."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import reload as reload_module
from agent.config import ConfigError, load
from agent.status import Level, Reading, assess, mismatch, reload_target, render
from tests.agentproc import write_config
from tests.unit.test_status_plugin import LIMITS, NOW, snapshot


def config_with(folder: Path, sources: list[dict[str, Any]], **main: Any) -> Path:
    return write_config(folder, "http://127.0.0.1:5984", sources, **main)


def source(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "paths": [f"/var/log/{name}.log"], "schema": "$date $message", **more}


def test_the_plan_names_added_removed_and_changed_sources(tmp_path: Path) -> None:
    path = config_with(tmp_path, [source("same"), source("edited"), source("dropped")])
    current = load(path)
    config_with(tmp_path, [source("same"), source("edited", fields={"k": "v"}), source("new")])
    (tmp_path / "conf.d" / "dropped.yaml").unlink()
    plan = reload_module.load(current, path)
    assert (plan.added, plan.removed, plan.changed) == (("new",), ("dropped",), ("edited",))
    assert plan.restarted == ("dropped", "edited")
    assert plan.restart_only == ()
    assert [s.name for s in plan.config.sources] == ["edited", "new", "same"]


@pytest.mark.parametrize("change", [{"regex": r"(?P<x>\d+)"}, {"include": ["x"]},
                                    {"database": "log_other"}, {"paths": ["/tmp/*.log"]},
                                    {"multiline": {"start": "^x"}}])
def test_any_key_of_a_source_is_a_change(tmp_path: Path, change: dict[str, Any]) -> None:
    path = config_with(tmp_path, [source("app")])
    current = load(path)
    edited = {k: v for k, v in source("app", **change).items()
              if not ("regex" in change and k == "schema")}
    config_with(tmp_path, [edited])
    assert reload_module.load(current, path).changed == ("app",)


@pytest.mark.parametrize("patterns", [
    {"include": ["NOTICE"], "exclude": ["Unban"]},  # plain words
    {"include": [r"N(OT)?ICE"], "multiline": {"start": r"^\d"}},  # RE2
    {"regex": r"(?P<x>\d+)"},
    {"include": [r"(a)\1"]},  # a backreference: the time-bounded fallback
])
def test_an_unchanged_source_with_patterns_is_not_a_change(
        tmp_path: Path, patterns: dict[str, Any]) -> None:
    """A reload restarts only the sources whose configuration changed; compiled patterns never
    compared equal, so every source with one was stopped and started at every reload."""
    app = {k: v for k, v in source("app", **patterns).items()
           if not ("regex" in patterns and k == "schema")}
    path = config_with(tmp_path, [app])
    current = load(path)
    assert reload_module.load(current, path).changed == ()


def test_settings_built_into_running_parts_wait_for_a_restart(tmp_path: Path) -> None:
    path = config_with(tmp_path, [source("app")])
    current = load(path)
    config_with(tmp_path, [source("app")], shipping={"batch_max_docs": 7},
                log={"level": "debug"}, status={"lag_warning": "1MiB"}, shutdown_timeout="3s")
    plan = reload_module.load(current, path)
    assert set(plan.restart_only) == {"shipping", "log.level"}
    # The running values stay; what only `agent status` or the shutdown reads is applied.
    assert plan.config.shipping == current.shipping
    assert plan.config.status.lag_warning == 1024**2
    assert plan.config.shutdown_timeout == 3.0


def test_a_broken_config_is_refused_with_the_check_problems(tmp_path: Path) -> None:
    path = config_with(tmp_path, [source("app")])
    current = load(path)
    config_with(tmp_path, [source("app", no_such_key=1)])
    with pytest.raises(ConfigError) as refused:
        reload_module.load(current, path)
    assert any(p.key == "no_such_key" for p in refused.value.problems)


def test_a_new_state_dir_is_refused(tmp_path: Path) -> None:
    path = config_with(tmp_path, [source("app")])
    current = load(path)
    config_with(tmp_path, [source("app")], state_dir=str(tmp_path / "other"))
    with pytest.raises(ConfigError) as refused:
        reload_module.load(current, path)
    [problem] = refused.value.problems
    assert problem.key == "state_dir" and "cannot change while the agent runs" in problem.message


def test_a_glob_reaching_the_running_state_dir_is_refused(tmp_path: Path) -> None:
    path = config_with(tmp_path, [source("app")])
    current = load(path)
    config_with(tmp_path, [{**source("app"), "paths": [str(current.state_dir / "*")]}])
    with pytest.raises(ConfigError, match="state_dir"):
        reload_module.load(current, path)


def reloaded(**reload: Any) -> dict[str, Any]:
    snap = snapshot()
    snap["reload"] = {"at": NOW - 30, "problems": [], **reload}
    return snap


def test_a_refused_reload_is_a_warning_naming_the_problem() -> None:
    snap = reloaded(ok=False, problems=["conf.d/app.yaml: regex: bad", "conf.d/app.yaml: x: no"])
    assert mismatch(snap) is None
    findings = assess(snap, NOW, LIMITS)
    assert [f.level for f in findings] == [Level.WARNING]
    assert "reload refused 30s ago" in findings[0].text
    assert "regex: bad (+1 more)" in findings[0].text
    text, code = render(snap, Path("/s"), now=NOW, limits=LIMITS)
    assert code == Level.WARNING and text.startswith("COUCHLOG WARNING - configuration reload")


def test_a_good_reload_is_ok_unless_settings_wait_for_a_restart() -> None:
    assert assess(reloaded(ok=True, restart_needed=[]), NOW, LIMITS) == []
    waiting = assess(reloaded(ok=True, restart_needed=["state_dir"]), NOW, LIMITS)
    assert [f.level for f in waiting] == [Level.WARNING] and "state_dir" in waiting[0].text


def test_a_malformed_reload_field_is_unknown() -> None:
    snap = reloaded(ok="no")
    assert mismatch(snap) == 'reload.ok is "no", expected true or false'
    assert render(snap, Path("/s"), now=NOW, limits=LIMITS)[1] == Level.UNKNOWN


def test_reload_signals_only_a_live_agent_with_a_fresh_snapshot() -> None:
    now = time.time()
    live = {**snapshot(), "pid": os.getpid(), "updated_at": now}
    assert reload_target(Reading(live), now)[0] == os.getpid()
    assert reload_target(Reading(None), now)[0] is None
    assert reload_target(Reading(problem="is not JSON"), now)[0] is None
    stale = {**live, "updated_at": now - 3600}
    pid, why = reload_target(Reading(stale), now)
    assert pid is None and "still runs" in why
