"""`agent status`: the daemon writes a snapshot on every tick; the CLI reads and explains it.

A file (`state_dir/status.json`, replaced atomically) rather than a socket:
it needs no extra listener, works when the reader may not talk to the
daemon, and still says what was last known when the daemon is gone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

STALE_AFTER = 15.0
EXIT_OK, EXIT_DEGRADED, EXIT_NOT_RUNNING = 0, 1, 3


class StatusFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "status.json"

    def write(self, snapshot: dict[str, Any]) -> None:
        """Replace the snapshot atomically (no fsync: it is rewritten every second). Blocking."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            value = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None


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


def render(snapshot: dict[str, Any] | None, path: Path, now: float | None = None) -> tuple[str, int]:
    """A person's view of the snapshot, and the exit code: 0 healthy, 1 degraded, 3 not running."""
    now = time.time() if now is None else now
    if snapshot is None:
        return (f"not running: no status at {path} (is `agent run` started with this config?)",
                EXIT_NOT_RUNNING)
    age = now - float(snapshot["updated_at"])
    if not _running(int(snapshot["pid"])) or age > STALE_AFTER:
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
    for part in snapshot.get("failing", ()):
        where = part.get("path") or part.get("database")
        problems.append(f"{part['part']}{f' {where}' if where else ''}: {part['error']} (failed "
                        f"{part['failures']} time(s) in a row, retrying)")
    head = (f"couchlog agent running (pid {snapshot['pid']}, up {_ago(now - snapshot['started_at'])}, "
            f"{files} file(s) by {snapshot['watch']}); {_size(behind)} unread, "
            f"{sum(d['queued'] for d in snapshot['databases'].values())} queued, "
            f"{sum(d['spool_records'] for d in snapshot['databases'].values())} spooled")
    health = "health: OK" if not problems else "health: DEGRADED\n" + "\n".join(
        f"  - {p}" for p in problems)
    text = "\n".join([head, health, "sources:", *source_lines, "databases:", *database_lines])
    return text, EXIT_DEGRADED if problems else EXIT_OK
