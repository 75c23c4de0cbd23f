"""`agent status`: the daemon writes a snapshot on every tick; the CLI reads and explains it.

A file (`state_dir/status.json`, replaced atomically) rather than a socket:
it needs no extra listener, works when the reader may not talk to the
daemon, and still says what was last known when the daemon is gone.

The file is 0640 and `agent status` reads only `state_dir` and the `status.*`
thresholds from the main config, never the password: an operator in the
agent's group can run it. A snapshot that cannot be trusted (not JSON, the
wrong shape, written "in the future") is UNKNOWN, exit 3, with what was found;
never a traceback.

`agent status` is a monitoring plugin (Nagios, Icinga, Sensu): its first line is
`COUCHLOG <LEVEL> - <summary> | <performance data>` and its exit code the level:

- 0 OK;
- 1 WARNING: CouchDB not reachable for less than `status.critical_after` (retrying), more
  unread bytes than `status.lag_warning`, a file that cannot be read, a database failed over
  to a fallback URL or one of its URLs down, documents dropped by `when_full: drop_oldest`,
  the last configuration reload refused (or settings it read that wait for a restart);
- 2 CRITICAL: CouchDB not reachable for longer than `status.critical_after`, the spool full
  and reading paused, a document dead-lettered within `status.dead_letter_window`;
- 3 UNKNOWN: not running (no snapshot, or its pid is gone), a snapshot older than
  STALE_AFTER from a live pid, written in the future, unreadable or of the wrong shape,
  or a main config whose `state_dir`/`status.*` cannot be read.

The snapshot's contract (what `mismatch` checks; extra keys are allowed):

- `pid`, `started_at`, `updated_at` (Unix times), `watch` (the watcher's mode);
- `sources[name]`: `files`, `lag` (unread bytes), `counters` (COUNTERS), `behind`
  (`[{"path", "lag"}]`, the files furthest behind), and, from the daemon when present,
  `failing`: `[{"path", "error", "since"}]` for files whose tailer failed (WARNING);
- `failing` (top level, when present): `[{"part", "error", "since", "failures", ...}]` for
  the other parts the daemon restarts after a failure (a shipper, the watcher), and the
  offsets while they cannot be saved (`retry` says how each is retried): WARNING;
- `reload` (when present: after the first reload): `{"ok", "at", "problems"}` and, when ok,
  `restart_needed` (config keys changed that apply at the next restart only). Not ok: the
  new configuration was refused with `problems` (as `agent check` says them) and the previous
  one runs on: WARNING, until a reload succeeds. `restart_needed` not empty: WARNING;
- `databases[db]`: `healthy`, `last_error`, `last_success`, `backpressure`, `stored`,
  `conflicts`, `queued`, `dead_lettered`, `spool_records`, `spool_bytes`,
  `spool.dropped_records`; and, from the shipper when present:
  - `down_since` (time or null): since when no URL took documents. Without it (an older
    snapshot) a database that is not `healthy` counts as down since its `last_success`
    (or the agent's start): the last attempt failed and nothing was stored since;
  - `last_dead_letter_at` (time or null). Without it, the dead-letter file's modification
    time stands in for a database with `dead_lettered` documents;
  - `urls`: `[{"url", "in_use", "state": "up"|"down"|"unknown", "down_since",
    "last_error", "last_error_at"}]`, each shown with its state; a `last_error` is shown
    with its age, never as current.

`assess` (pure: snapshot, clock, thresholds, dead-letter time in; findings out) decides the
level; `render` writes it out; only `report`'s callers touch the file system.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent import durable
from agent.config import (
    DEFAULT_STATE_DIR,
    ConfigError,
    Problem,
    StatusConfig,
    load_yaml,
    redact_url,
    status_thresholds,
)
from agent.deadletter import DeadLetterFile
from agent.ratelimit import RepeatedFailure

STALE_AFTER = 15.0
"""Seconds after which the snapshot of a live pid is distrusted (the daemon writes one every
few seconds, idle or not)."""
CLOCK_SLACK = 5.0
"""Seconds an `updated_at` may lie ahead of the reader's clock before the snapshot is distrusted."""


class Level(IntEnum):
    """The monitoring-plugin levels; each is the exit code of `agent status`."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


EXIT_OK, EXIT_WARNING, EXIT_CRITICAL, EXIT_UNKNOWN = (int(level) for level in Level)
EXIT_DEGRADED = EXIT_WARNING
"""The name of 1 before CRITICAL existed (kept for callers)."""
EXIT_NOT_RUNNING = EXIT_UNKNOWN
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
    return settings_of(config_path)[0]


def settings_of(config_path: Path) -> tuple[Path, StatusConfig]:
    """`state_dir` and the `status.*` thresholds of the main config file, and nothing else."""
    problems: list[Problem] = []
    data = load_yaml(config_path, problems)
    if data is None:
        raise ConfigError(problems)
    data = data if isinstance(data, dict) else {}
    value = data.get("state_dir", str(DEFAULT_STATE_DIR))
    if not isinstance(value, str) or not value:
        raise ConfigError([Problem(config_path, "state_dir", "expected a folder path (a string)")])
    return config_path.parent / value, status_thresholds(config_path, data)


def last_dead_letter(state_dir: Path) -> float | None:
    """When the dead-letter file was last appended to (None: no file, or an empty one). Blocking.

    It holds every database's refusals across restarts, so it says "refused within the last
    hour" even for a snapshot whose shipper does not say when (`last_dead_letter_at`)."""
    try:
        found = DeadLetterFile(state_dir).path.stat()
    except OSError:
        return None
    return found.st_mtime if found.st_size else None


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


def report(reading: Reading, path: Path, now: float | None = None,
           limits: StatusConfig | None = None, dead_letter_at: float | None = None,
           ) -> tuple[str, int]:
    """`render` for what `StatusFile.read` found."""
    if reading.problem is not None:
        return _unknown(path, reading.problem)
    return render(reading.value, path, now, limits, dead_letter_at)


def _unknown(path: Path, found: str) -> tuple[str, int]:
    return unknown(f"the status file {path} {found}; the agent writes it every few seconds "
                   "while running: check `systemctl status couchlog-agent` or its journal")


def unknown(what: str) -> tuple[str, int]:
    """The output and exit code of an UNKNOWN: one line, no performance data."""
    return f"COUCHLOG UNKNOWN - {_one_line(what)}", EXIT_UNKNOWN


def _one_line(text: str) -> str:
    """`text` fit for a plugin's first line: one line, and no `|` (it starts performance data)."""
    return " ".join(text.split()).replace("|", "/")


# -- what a snapshot must hold for `render` to explain it (extra keys are allowed)


@dataclass(frozen=True, slots=True)
class _Is:
    test: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True, slots=True)
class _Optional:
    """A key older snapshots lack: checked when present."""

    shape: Any


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
_URL_STATE = _Is(lambda v: v in ("up", "down", "unknown"), '"up", "down" or "unknown"')
COUNTERS = ("lines", "matched", "unmatched", "filtered", "empty", "invalid_encoding", "truncated")
_SHAPE = {
    "pid": _PID, "started_at": _TIME, "updated_at": _TIME, "watch": _TEXT,
    "failing": _Optional([{"part": _TEXT, "error": _TEXT, "since": _TIME}]),
    "reload": _Optional({"ok": _FLAG, "at": _TIME, "problems": [_TEXT],
                         "restart_needed": _Optional([_TEXT])}),
    "sources": _Each({"files": _COUNT, "lag": _COUNT, "counters": dict.fromkeys(COUNTERS, _COUNT),
                      "behind": [{"path": _TEXT, "lag": _COUNT}],
                      "failing": _Optional([{"path": _TEXT, "error": _TEXT, "since": _TIME}])}),
    "databases": _Each({"healthy": _FLAG, "last_error": _OPTIONAL_TEXT, "backpressure": _FLAG,
                        "dead_lettered": _COUNT, "last_success": _OPTIONAL_TIME, "stored": _COUNT,
                        "conflicts": _COUNT, "queued": _COUNT, "spool_records": _COUNT,
                        "spool_bytes": _COUNT, "spool": {"dropped_records": _COUNT},
                        "down_since": _Optional(_OPTIONAL_TIME),
                        "last_dead_letter_at": _Optional(_OPTIONAL_TIME),
                        "urls": _Optional([{"url": _TEXT, "in_use": _FLAG, "state": _URL_STATE,
                                            "down_since": _OPTIONAL_TIME,
                                            "last_error": _OPTIONAL_TEXT,
                                            "last_error_at": _OPTIONAL_TIME}])}),
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
            if isinstance(inner, _Optional):
                continue
            return f"has no {at}"
        found = mismatch(value[key], inner.shape if isinstance(inner, _Optional) else inner, at)
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


def _since(now: float, at: float) -> str:
    return _ago(max(0.0, now - at))


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing `agent status` reports, and how bad it is."""

    level: Level
    text: str


def trust(snapshot: Mapping[str, Any], now: float, alive: bool) -> str | None:
    """Why a well-formed snapshot says nothing about the agent now (UNKNOWN), or None."""
    age = now - snapshot["updated_at"]
    pid = snapshot["pid"]
    if alive and age < -CLOCK_SLACK:
        return f"was updated {_ago(-age)} in the future by the live pid {pid} (was the clock changed?)"
    if alive and age > STALE_AFTER:
        # Not "not running": a live agent that cannot write state_dir (a full disk) looks so.
        return (f"has the last status {_ago(age)} ago, yet pid {pid} still runs (or its number "
                "was reused): the agent may be stuck, or unable to write there (look for "
                "status_write_failed in its log)")
    return None


def down_since(database: Mapping[str, Any], started_at: float) -> float | None:
    """Since when CouchDB took no document from this database's shipper; None while it does."""
    if "down_since" in database:
        value: float | None = database["down_since"]
        return value
    if database["healthy"]:
        return None
    # An older snapshot says only that the last attempt failed: nothing was stored since the
    # last success (or the start), which is as long as CouchDB may have been down.
    return database["last_success"] if database["last_success"] is not None else started_at


def assess(snapshot: Mapping[str, Any], now: float, limits: StatusConfig,
           dead_letter_at: float | None = None) -> list[Finding]:
    """What is wrong with a running agent, worst first (empty: OK). Pure.

    `dead_letter_at` is when the dead-letter file was last written (see `last_dead_letter`)."""
    found: list[Finding] = []
    behind = sum(s["lag"] for s in snapshot["sources"].values())
    if behind > limits.lag_warning:
        found.append(Finding(Level.WARNING, f"{_size(behind)} unread, over status.lag_warning "
                             f"({_size(limits.lag_warning)})"))
    for name, source in sorted(snapshot["sources"].items()):
        for failing in source.get("failing", ()):
            found.append(Finding(Level.WARNING, f"{name}: cannot read {failing['path']} for "
                                 f"{_since(now, failing['since'])}: {failing['error']}"))
    for part in snapshot.get("failing") or ():
        where = part.get("database") or ""
        found.append(Finding(Level.WARNING, f"{part['part']}{f' {where}' if where else ''} "
                             f"failing for {_since(now, part['since'])}, "
                             f"{part.get('retry', 'restarted with backoff')}: "
                             f"{part['error']}"))
    found += _reload_findings(snapshot.get("reload"), now)
    dead_letters_told = False
    for name, db in sorted(snapshot["databases"].items()):
        down = down_since(db, snapshot["started_at"])
        if down is not None:
            error = db["last_error"] or "no answer"
            if now - down > limits.critical_after:
                found.append(Finding(Level.CRITICAL, f"{name}: {error} (CouchDB not reachable "
                                     f"for {_since(now, down)}, over status.critical_after "
                                     f"{_ago(limits.critical_after)})"))
            else:
                found.append(Finding(Level.WARNING, f"{name}: {error} (CouchDB not reachable "
                                     f"for {_since(now, down)}, retrying)"))
        # The flag also stands with an empty spool whose folder cannot be written: reading is
        # paused all the same (the shipper clears it once the documents it holds are stored).
        if db["backpressure"]:
            found.append(Finding(Level.CRITICAL, f"{name}: spool full, reading paused"))
        if db["spool"]["dropped_records"]:
            found.append(Finding(Level.WARNING, f"{name}: spool full, "
                                 f"{db['spool']['dropped_records']} document(s) dropped by "
                                 "when_full: drop_oldest"))
        refused = db["dead_lettered"]
        last = db.get("last_dead_letter_at", dead_letter_at if refused else None)
        if last is not None and now - last <= limits.dead_letter_window:
            dead_letters_told = True
            found.append(Finding(Level.CRITICAL, f"{name}: {refused} document(s) refused, the "
                                 f"last {_since(now, last)} ago; see dead-letter.jsonl in "
                                 "state_dir"))
        elif refused and last is None:
            found.append(Finding(Level.WARNING, f"{name}: {refused} document(s) refused, see "
                                 "dead-letter.jsonl in state_dir"))
        # While the database is down its finding says so; the URL lines say which failed how.
        for index, url in enumerate(db.get("urls") or () if down is None else ()):
            if url["in_use"] and index > 0:
                found.append(Finding(Level.WARNING, f"{name}: failed over to "
                                     f"{redact_url(url['url'])}"))
            elif url["state"] == "down" and not url["in_use"]:
                since = "" if url["down_since"] is None else f" for {_since(now, url['down_since'])}"
                found.append(Finding(Level.WARNING, f"{name}: {redact_url(url['url'])} down{since}"))
    if (not dead_letters_told and dead_letter_at is not None
            and now - dead_letter_at <= limits.dead_letter_window):
        found.append(Finding(Level.CRITICAL, f"a document was refused {_since(now, dead_letter_at)} "
                             "ago (before this agent started); see dead-letter.jsonl in state_dir"))
    return sorted(found, key=lambda f: -f.level)


def _reload_findings(reload: Mapping[str, Any] | None, now: float) -> list[Finding]:
    """The last reload: refused (the previous configuration runs on), or applied with settings
    that wait for a restart."""
    if reload is None:
        return []
    if not reload["ok"]:
        problems = reload["problems"] or ["no reason given"]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return [Finding(Level.WARNING, f"configuration reload refused {_since(now, reload['at'])} "
                        f"ago, the previous one runs on: {problems[0]}{more}; fix it (agent "
                        "check) and reload again")]
    waiting = reload.get("restart_needed") or []
    if waiting:
        return [Finding(Level.WARNING, f"reloaded configuration changes {', '.join(waiting)}: "
                        "applied at the next restart only")]
    return []


def reload_target(reading: Reading, now: float | None = None) -> tuple[int | None, str]:
    """The pid of the agent whose snapshot `reading` is, if it runs and the snapshot is fresh
    (a stale one's pid may have been reused by another process: never signal that), else None;
    and what was found, for the message."""
    now = time.time() if now is None else now
    if reading.problem is not None:
        return None, f"the status file {reading.problem}"
    snapshot = reading.value
    if snapshot is None:
        return None, "there is no status file: the agent is not running with this config"
    wrong = mismatch(snapshot)
    if wrong is not None:
        return None, f"the status file is not a status snapshot: {wrong}"
    pid = snapshot["pid"]
    if not _running(pid):
        return None, f"the agent is not running (pid {pid} is gone)"
    distrust = trust(snapshot, now, alive=True)
    if distrust is not None:
        return None, f"the status file {distrust}"
    return pid, f"pid {pid}"


def perfdata(snapshot: Mapping[str, Any], now: float, limits: StatusConfig) -> str:
    """Performance data, `label=value[UOM];warn;crit;min;max` each (plugin guidelines)."""
    sources, dbs = snapshot["sources"].values(), snapshot["databases"].values()
    downs = [now - d for db in dbs if (d := down_since(db, snapshot["started_at"])) is not None]
    values = [
        ("files", sum(s["files"] for s in sources), "", "", ""),
        ("lag_bytes", sum(s["lag"] for s in sources), "B", limits.lag_warning, ""),
        ("spool_bytes", sum(d["spool_bytes"] for d in dbs), "B", "", ""),
        ("spooled", sum(d["spool_records"] for d in dbs), "", "", ""),
        ("queued", sum(d["queued"] for d in dbs), "", "", ""),
        ("down_seconds", round(max([0.0, *downs])), "s", "", round(limits.critical_after)),
        ("stored", sum(d["stored"] for d in dbs), "c", "", ""),
        ("conflicts", sum(d["conflicts"] for d in dbs), "c", "", ""),
        ("dead_lettered", sum(d["dead_lettered"] for d in dbs), "c", "", ""),
        ("lines", sum(s["counters"]["lines"] for s in sources), "c", "", ""),
    ]
    return " ".join(f"{label}={value}{unit};{warn};{crit};0;" for label, value, unit, warn, crit
                    in values)


def render(snapshot: Any, path: Path, now: float | None = None,
           limits: StatusConfig | None = None, dead_letter_at: float | None = None,
           ) -> tuple[str, int]:
    """The plugin output for a snapshot (any JSON value; None: no status file) and its exit
    code (`Level`): a first line for Nagios/Icinga, then a person's view."""
    now = time.time() if now is None else now
    limits = StatusConfig() if limits is None else limits
    if snapshot is None:
        return unknown(f"not running: no status at {path} (is `agent run` started with this "
                       "config?)")
    wrong = mismatch(snapshot)
    if wrong is not None:
        return _unknown(path, f"is not a status snapshot: {wrong}")
    alive = _running(snapshot["pid"])
    distrust = trust(snapshot, now, alive)
    if distrust is not None:
        return _unknown(path, distrust)
    if not alive:
        return unknown(f"not running: last status {_since(now, snapshot['updated_at'])} ago from "
                       f"pid {snapshot['pid']}; check `systemctl status couchlog-agent` or its "
                       "journal")
    findings = assess(snapshot, now, limits, dead_letter_at)
    level = findings[0].level if findings else Level.OK
    sources, dbs = snapshot["sources"], snapshot["databases"]
    files = sum(s["files"] for s in sources.values())
    behind = sum(s["lag"] for s in sources.values())
    spool_bytes = sum(d["spool_bytes"] for d in dbs.values())
    spooled = sum(d["spool_records"] for d in dbs.values())
    spool = (f"spool {_size(spool_bytes)} ({spooled} document(s))" if spooled or spool_bytes
             else "spool empty")
    # The worst findings (at most 3), how many more the details list, then the figures.
    shown = [f.text for f in findings if f.level == level][:3]
    if len(findings) > len(shown):
        shown[-1] += f" (+{len(findings) - len(shown)} more)"
    summary = "; ".join([*shown, f"{files} files, {_size(behind)} behind, {spool}"])
    first = f"COUCHLOG {level.name} - {_one_line(summary)} | {perfdata(snapshot, now, limits)}"
    head = (f"couchlog agent running (pid {snapshot['pid']}, up "
            f"{_since(now, snapshot['started_at'])}, {files} file(s) by {snapshot['watch']}); "
            f"{_size(behind)} unread, {sum(d['queued'] for d in dbs.values())} queued, "
            f"{spooled} spooled")
    health = ["health: OK"] if not findings else [
        f"health: {level.name}", *(f"  - {f.level.name}: {f.text}" for f in findings)]
    text = "\n".join([first, head, *health, "sources:", *_source_lines(sources, now),
                      "databases:", *_database_lines(snapshot, now)])
    return text, int(level)


def _source_lines(sources: Mapping[str, Any], now: float) -> list[str]:
    lines = []
    for name, source in sorted(sources.items()):
        c = source["counters"]
        lines.append(f"  {name:16} {source['files']} file(s), {_size(source['lag'])} unread; "
                     f"lines {c['lines']}, matched {c['matched']}, unmatched {c['unmatched']}, "
                     f"filtered {c['filtered'] + c['empty']}, invalid {c['invalid_encoding']}, "
                     f"truncated {c['truncated']}")
        lines += [f"    {_size(f['lag'])} unread in {f['path']}" for f in source["behind"]]
        lines += [f"    failing for {_since(now, f['since'])}: {f['path']}: {f['error']}"
                  for f in source.get("failing", ())]
    return lines


def _database_lines(snapshot: Mapping[str, Any], now: float) -> list[str]:
    lines = []
    for name, db in sorted(snapshot["databases"].items()):
        down = down_since(db, snapshot["started_at"])
        state = "ok" if down is None else f"CouchDB not reachable since {_clock(down)}"
        success = "never" if db["last_success"] is None else f"{_since(now, db['last_success'])} ago"
        dead = db.get("last_dead_letter_at")
        dead_text = f" (the last {_since(now, dead)} ago)" if dead is not None else ""
        lines.append(f"  {name:16} {state}; stored {db['stored']}, already there "
                     f"{db['conflicts']}, queued {db['queued']}, spooled {db['spool_records']} "
                     f"({_size(db['spool_bytes'])}), dead-lettered {db['dead_lettered']}"
                     f"{dead_text}; last stored {success}")
        if down is not None and db["last_error"]:
            lines.append(f"    error: {db['last_error']}")
        elif db["last_error"] and "urls" not in db:
            # No time comes with it: say only that documents were stored after it.
            lines.append(f"    earlier error (documents stored since): {db['last_error']}")
        for url in db.get("urls") or ():
            lines.append("    " + _url_line(url, now))
    return lines


def _url_line(url: Mapping[str, Any], now: float) -> str:
    """One CouchDB URL: in use or not, up/down (since when), and its last error with its age."""
    use = "in use" if url["in_use"] else "standby"
    if url["state"] == "down":
        state = "down" if url["down_since"] is None else (
            f"down since {_clock(url['down_since'])} ({_since(now, url['down_since'])})")
    else:
        state = url["state"]
    error = ""
    if url["last_error"] is not None:
        when = ("at an unknown time" if url["last_error_at"] is None
                else f"{_since(now, url['last_error_at'])} ago")
        error = f"; last error {when}: {url['last_error']}"
    return f"{redact_url(url['url'])}: {use}, {state}{error}"
