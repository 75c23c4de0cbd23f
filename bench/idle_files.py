"""Idle cost of following many files: CPU seconds over a quiet minute, and RSS.

Creates N log files (3 lines each), runs `agent run` on them against the test server (or
COUCHDB_URL), waits until every line is stored, then measures the agent's CPU time over
--seconds of silence and its resident memory.

    .venv/bin/python bench/idle_files.py [--files 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import PouchDBServer  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.agentproc import write_config  # noqa: E402
from tests.couch import CouchDB  # noqa: E402


def run(url: str, work: Path, files: int, seconds: float) -> dict[str, float]:
    logs = work / "logs"
    logs.mkdir()
    for i in range(files):
        (logs / f"f{i:04d}.log").write_text("".join(f"file {i} line {n}\n" for n in range(3)))
    couch = CouchDB(url)
    database = "log_bench_idle"
    couch.delete_db(database)
    couch.create_db(database)
    config = write_config(work / "etc", url, [{"name": "idle", "database": database,
                                               "paths": [str(logs / "*.log")], "schema": "$msg..."}],
                          log={"level": "warning"}, scan_interval="10s")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                             stderr=open(work / "agent.log", "wb"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 300
        while couch.count(database) < files * 3:
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit(f"not shipped; see {work / 'agent.log'}")
            time.sleep(0.5)
        time.sleep(2)
        before = cpu_seconds(agent.pid)
        time.sleep(seconds)
        idle = cpu_seconds(agent.pid) - before
        memory = memory_mib(agent.pid)
        fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        couch.delete_db(database)
    return {"files": files, "idle_cpu_s": idle, "idle_seconds": seconds,
            "rss_mib": memory["VmRSS"], "peak_rss_mib": memory["VmHWM"], "fds": fds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = os.environ.get("COUCHDB_URL")
        if url:
            result = run(url, work, args.files, args.seconds)
        else:
            with PouchDBServer(work / "couchdb") as server:
                result = run(server.url, work, args.files, args.seconds)
    print(json.dumps(result))
    print(f"{result['files']} files followed: {result['idle_cpu_s']:.3f} CPU s over "
          f"{result['idle_seconds']:.0f} s idle ({60 * result['idle_cpu_s'] / result['idle_seconds']:.3f} "
          f"s/min), RSS {result['rss_mib']:.0f} MiB (peak {result['peak_rss_mib']:.0f} MiB), "
          f"{result['fds']} open fds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
