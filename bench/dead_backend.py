"""Memory while CouchDB is unreachable: 1M lines read into the disk spool, peak RSS measured.

The agent follows a generated fail2ban log (the seed's filter and schema) with its only
CouchDB URL on a closed port, so every document goes to the spool. Reports the agent's peak
resident memory (VmHWM) and how long it took to spool everything.

    .venv/bin/python bench/dead_backend.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import free_port  # noqa: E402
from bench.common import agent_running, wait_spooled  # noqa: E402
from bench.fail2ban_log import SEED_SCHEMA, count_kept  # noqa: E402
from bench.parse_speed import workload  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.agentproc import write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    log = workload(args.lines)
    kept = count_kept(log)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # A port that was free a moment ago: nothing listens there.
        config = write_config(work / "etc", f"http://127.0.0.1:{free_port()}", [{
            "name": "fail2ban", "paths": [str(log)], "include": ["NOTICE", "Ban"],
            "schema": SEED_SCHEMA, "fields": {"machine": "server"}}],
            spool={"max_bytes": "4GiB"}, log={"level": "warning"})
        started = time.monotonic()
        with agent_running(config, stop_timeout=120,
                           stderr=open(work / "agent.log", "wb")) as agent:
            spooled = wait_spooled(agent, work / "etc" / "state", kept, work / "agent.log")
            elapsed = time.monotonic() - started
            memory = memory_mib(agent.pid)
            cpu = cpu_seconds(agent.pid)
            spool_bytes = sum(p.stat().st_size for p in (work / "etc/state/spool").rglob("*.seg"))
    result = {"lines": args.lines, "documents_spooled": spooled, "seconds": round(elapsed, 1),
              "cpu_s": round(cpu, 1), "peak_rss_mib": round(memory["VmHWM"], 1),
              "rss_mib": round(memory["VmRSS"], 1), "spool_mib": round(spool_bytes / 2**20, 1)}
    print(json.dumps(result))
    print(f"{args.lines} lines with CouchDB down: {spooled} documents spooled "
          f"({result['spool_mib']} MiB) in {result['seconds']} s; peak RSS {result['peak_rss_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
