"""What the agent benchmarks share: a backend to ship to, the agent as a child, waiting for it.

bench/peers.py holds what the agent-against-syslog-ng benchmarks share; this is for the ones
that run `agent run` against CouchDB (or a closed port) and wait for its documents.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import PouchDBServer  # noqa: E402
from tests.couch import CouchDB  # noqa: E402


@contextmanager
def couchdb_url(data_dir: Path) -> Iterator[tuple[str, PouchDBServer | None]]:
    """COUCHDB_URL if it is set, else a pouchdb-server started in `data_dir` (stopped after);
    with the server, or None for COUCHDB_URL, so the caller can say which it measured."""
    url = os.environ.get("COUCHDB_URL")
    if url:
        yield url, None
        return
    server = PouchDBServer(data_dir)
    server.start()
    try:
        yield server.url, server
    finally:
        server.stop()


@contextmanager
def agent_running(config: Path, stop_timeout: float = 60, env: dict[str, str] | None = None,
                  stdout: IO[bytes] | int | None = None,
                  stderr: IO[bytes] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`agent run -c config` as a child, stopped with SIGTERM (and waited for) on leaving."""
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                             env=env, stdout=stdout, stderr=stderr)
    try:
        yield agent
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=stop_timeout)


def wait_stored(couch: CouchDB, database: str, want: int, agent: subprocess.Popen[bytes],
                timeout: float = math.inf, poll: float = 0.05) -> None:
    """Return once `database` holds `want` documents; raise if the agent exits or `timeout`
    seconds pass first."""
    deadline = time.monotonic() + timeout
    while (have := couch.count(database)) < want:
        if agent.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.returncode} after {have} of {want} "
                               f"documents reached {database}")
        if time.monotonic() > deadline:
            raise SystemExit(f"only {have} of {want} documents reached {database} in "
                             f"{timeout:.0f}s")
        time.sleep(poll)


def wait_spooled(agent: subprocess.Popen[bytes], state_dir: Path, want: int, log: Path,
                 timeout: float = math.inf) -> int:
    """Wait until the agent's status snapshot counts `want` records in its spools; return the
    count. Exits with the end of the agent's `log` if it stops first."""
    status = state_dir / "status.json"
    started = time.monotonic()
    spooled = 0
    while spooled < want:
        time.sleep(0.5)
        if agent.poll() is not None:
            raise SystemExit(log.read_text()[-2000:])
        if time.monotonic() - started > timeout:
            raise SystemExit(f"only {spooled} of {want} documents spooled in {timeout} s")
        if status.exists():
            try:
                snapshot = json.loads(status.read_text())
            except ValueError:
                continue
            spooled = sum(d["spool_records"] for d in snapshot["databases"].values())
    return spooled
