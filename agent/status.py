"""`agent status`: the daemon writes a snapshot on every tick; the CLI reads and explains it.

A file (`state_dir/status.json`, replaced atomically) rather than a socket:
it needs no extra listener, works when the reader may not talk to the
daemon, and still says what was last known when the daemon is gone.

The file is 0640 and `agent status` reads only `state_dir` from the main
config, never the password: an operator in the agent's group can run it. A
snapshot that cannot be trusted (not JSON, the wrong shape, written "in the
future") is UNKNOWN, exit 3, with what was found; never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent import durable
from agent.config import DEFAULT_STATE_DIR, ConfigError, Problem, load_yaml
from agent.ratelimit import RepeatedFailure

STALE_AFTER = 15.0
CLOCK_SLACK = 5.0
"""Seconds an `updated_at` may lie ahead of the reader's clock before the snapshot is distrusted."""
EXIT_OK, EXIT_DEGRADED, EXIT_NOT_RUNNING = 0, 1, 3
EXIT_UNKNOWN = 3
"""A snapshot that cannot be trusted: as for monitoring plugins, 3 means UNKNOWN."""
MAX_BYTES = 16 * 1024**2
"""Largest snapshot read: the agent writes a few KiB (the files furthest behind, not all)."""
MODE = 0o640
"""Readable by the agent's group, so an operator in it can run `agent status` without root."""
log = structlog.get_logger("agent.status")


@dataclass(frozen=True, slots=True)
class Reading:
    """What `StatusFile.read` found: the parsed JSON (any type; None when there is no file),
    or why nothing could be parsed."""

    value: Any = None
    problem: str | None = None


def state_dir_of(config_path: Path) -> Path:
    """The `state_dir` set by the main config file, reading nothing else: `agent status` needs
    no secret (an operator may not be allowed to read the password file) and no source file."""
    problems: list[Problem] = []
    data = load_yaml(config_path, problems)
    if data is None:
        raise ConfigError(problems)
    value = data.get("state_dir", str(DEFAULT_STATE_DIR))
    if not isinstance(value, str) or not value:
        raise ConfigError([Problem(config_path, "state_dir", "expected a folder path (a string)")])
    return config_path.parent / value


class StatusFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "status.json"
        self.failures = RepeatedFailure(log, "status_write_failed")

    def write(self, snapshot: dict[str, Any]) -> bool:
        """Replace the snapshot atomically; False if it could not be written. Blocking.

        Never raises OSError: a full disk or a read-only state folder must not stop the agent
        over a snapshot. Failures are logged rate-limited (first, then one summary a minute).
        No fsync: the file is rewritten every few seconds, and one lost in a power cut reads as
        absent or unknown, never as a wrong answer.
        """
        try:
            durable.replace_file(self.path, orjson.dumps(snapshot, option=orjson.OPT_INDENT_2),
                                 mode=MODE, sync=False)
        except OSError as exc:
            self.failures.failed(path=str(self.path), error=str(exc),
                                 action="free space in state_dir or make it writable by the "
                                 "agent; shipping goes on, `agent status` shows the last snapshot")
            return False
        self.failures.succeeded(path=str(self.path))
        return True

    def read(self) -> Reading:
        try:
            data = durable.read_regular_file(self.path, MAX_BYTES)
        except FileNotFoundError:
            return Reading()
        except OSError as exc:
            return Reading(problem=f"cannot be read ({exc.strerror or exc})")
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return Reading(problem=f"is not JSON ({exc}; {len(data)} bytes)")
        if value is None:
            return Reading(problem="holds null, not a status snapshot")
        return Reading(value)


def report(reading: Reading, path: Path, now: float | None = None) -> tuple[str, int]:
    """`render` for what `StatusFile.read` found."""
    if reading.problem is not None:
        return _unknown(path, reading.problem)
    return render(reading.value, path, now)


def _unknown(path: Path, found: str) -> tuple[str, int]:
    return (f"unknown: the status file {path} {found}; the agent writes it every few seconds "
            "while running: check `systemctl status couchlog-agent` or its journal", EXIT_UNKNOWN)


# -- what a snapshot must hold for `render` to explain it (extra keys are allowed)


@dataclass(frozen=True, slots=True)
class _Is:
    test: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True, slots=True)
class _Each:
    """A JSON object with any keys, each value of `shape`."""

    shape: Any


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Bounded, so that the arithmetic of `render` (sizes, ages) cannot overflow.
_COUNT = _Is(lambda v: _int(v) and 0 <= v < 2**63, "a whole number from 0 to 2**63")
_TIME = _Is(lambda v: (_int(v) or isinstance(v, float)) and math.isfinite(v) and 0 <= v < 1e11,
            "a Unix time")
_OPTIONAL_TIME = _Is(lambda v: v is None or _TIME.test(v), "a Unix time or null")
_PID = _Is(lambda v: _int(v) and 1 <= v <= 2**22, "a process id")
_TEXT = _Is(lambda v: isinstance(v, str), "a string")
_OPTIONAL_TEXT = _Is(lambda v: v is None or isinstance(v, str), "a string or null")
_FLAG = _Is(lambda v: isinstance(v, bool), "true or false")
COUNTERS = ("lines", "matched", "unmatched", "filtered", "empty", "invalid_encoding", "truncated")
_SHAPE = {
    "pid": _PID, "started_at": _TIME, "updated_at": _TIME, "watch": _TEXT,
    "sources": _Each({"files": _COUNT, "lag": _COUNT, "counters": dict.fromkeys(COUNTERS, _COUNT),
                      "behind": [{"path": _TEXT, "lag": _COUNT}]}),
    "databases": _Each({"healthy": _FLAG, "last_error": _OPTIONAL_TEXT, "backpressure": _FLAG,
                        "dead_lettered": _COUNT, "last_success": _OPTIONAL_TIME, "stored": _COUNT,
                        "conflicts": _COUNT, "queued": _COUNT, "spool_records": _COUNT,
                        "spool_bytes": _COUNT, "spool": {"dropped_records": _COUNT}}),
}


def mismatch(value: Any, shape: Any = None, where: str = "") -> str | None:
    """What in `value` does not fit the snapshot's shape, or None if it all does."""
    shape = _SHAPE if shape is None else shape
    if isinstance(shape, _Is):
        return None if shape.test(value) else f"{where} is {_brief(value)}, expected {shape.expected}"
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {_brief(value)}, expected a list"
        return next((m for i, item in enumerate(value)
                     if (m := mismatch(item, shape[0], f"{where}[{i}]")) is not None), None)
    if not isinstance(value, dict):
        return f"{where or 'the snapshot'} is {_brief(value)}, expected an object"
    if isinstance(shape, _Each):
        return next((m for key, item in value.items()
                     if (m := mismatch(item, shape.shape, f"{where}.{key}".lstrip("."))) is not None),
                    None)
    assert isinstance(shape, Mapping)
    for key, inner in shape.items():
        at = f"{where}.{key}".lstrip(".")
        if key not in value:
            return f"has no {at}"
        found = mismatch(value[key], inner, at)
        if found is not None:
            return found
    return None


def _brief(value: Any) -> str:
    try:
        text = json.dumps(value)  # not orjson: a value from elsewhere may hold integers past 64 bits
    except RecursionError:  # orjson reads JSON nested 1024 deep, json writes fewer levels
        return "a value nested too deeply"
    return text if len(text) <= 40 else text[:37] + "..."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(snapshot: Any, path: Path, now: float | None = None) -> tuple[str, int]:
    """A person's view of the snapshot (any JSON value; None: no status file), and the exit
    code: 0 healthy, 1 degraded, 3 not running or unknown (a snapshot that cannot be trusted)."""
    now = time.time() if now is None else now
    if snapshot is None:
        return (f"not running: no status at {path} (is `agent run` started with this config?)",
                EXIT_NOT_RUNNING)
    wrong = mismatch(snapshot)
    if wrong is not None:
        return _unknown(path, f"is not a status snapshot: {wrong}")
    age = now - snapshot["updated_at"]
    alive = _running(snapshot["pid"])
    if alive and age < -CLOCK_SLACK:
        return _unknown(path, f"was updated {_ago(-age)} in the future by the live pid "
                        f"{snapshot['pid']} (was the clock changed?)")
    if alive and age > STALE_AFTER:
        # Not "not running": a live agent that cannot write state_dir (a full disk) looks so.
        return _unknown(path, f"has the last status {_ago(age)} ago, yet pid {snapshot['pid']} "
                        "still runs (or its number was reused): the agent may be stuck, or "
                        "unable to write there (look for status_write_failed in its log)")
    if not alive:
        return (f"not running: last status {_ago(age)} ago from pid {snapshot['pid']}; "
                f"check `systemctl status couchlog-agent` or its journal", EXIT_NOT_RUNNING)
    problems = []
    source_lines = []
    database_lines = []
    behind = 0
    files = 0
    for name, source in sorted(snapshot["sources"].items()):
        lag = source["lag"]
        behind += lag
        files += source["files"]
        c = source["counters"]
        source_lines.append(f"  {name:16} {source['files']} file(s), {_size(lag)} unread; lines "
                     f"{c['lines']}, matched {c['matched']}, unmatched {c['unmatched']}, "
                     f"filtered {c['filtered'] + c['empty']}, invalid {c['invalid_encoding']}, "
                     f"truncated {c['truncated']}")
        source_lines += [f"    {_size(f['lag'])} unread in {f['path']}" for f in source["behind"]]
    for name, db in sorted(snapshot["databases"].items()):
        state = "ok" if db["healthy"] else "CouchDB not reachable"
        if not db["healthy"]:
            problems.append(f"{name}: {db['last_error'] or 'CouchDB not reachable'}")
        if db["backpressure"]:
            problems.append(f"{name}: spool full, reading paused")
        if db["spool"]["dropped_records"]:
            problems.append(f"{name}: spool full, {db['spool']['dropped_records']} document(s) "
                            "dropped by when_full: drop_oldest")
        if db["dead_lettered"]:
            problems.append(f"{name}: {db['dead_lettered']} document(s) refused, see dead-letter.jsonl")
        success = "never" if db["last_success"] is None else f"{_ago(now - db['last_success'])} ago"
        database_lines.append(f"  {name:16} {state}; stored {db['stored']}, already there {db['conflicts']}, "
                     f"queued {db['queued']}, spooled {db['spool_records']} "
                     f"({_size(db['spool_bytes'])}), dead-lettered {db['dead_lettered']}; "
                     f"last stored {success}")
    head = (f"couchlog agent running (pid {snapshot['pid']}, up {_ago(now - snapshot['started_at'])}, "
            f"{files} file(s) by {snapshot['watch']}); {_size(behind)} unread, "
            f"{sum(d['queued'] for d in snapshot['databases'].values())} queued, "
            f"{sum(d['spool_records'] for d in snapshot['databases'].values())} spooled")
    health = "health: OK" if not problems else "health: DEGRADED\n" + "\n".join(
        f"  - {p}" for p in problems)
    text = "\n".join([head, health, "sources:", *source_lines, "databases:", *database_lines])
    return text, EXIT_DEGRADED if problems else EXIT_OK
