"""Memory across files: 1,000 logs with a 1 MB backlog each, CouchDB unreachable, peak RSS.

Every file is there before the agent starts, so every tailer has a backlog
to catch up on at once; the only CouchDB URL is a closed port, so every
document goes to the disk spool. Memory is bounded across files when the
peak stays near the one-big-file figure (`bench/dead_backend.py`): the
tailers share one read budget, so only a few chunks are read and not yet
queued at any time, whatever the number of files. Reports the agent's peak
resident memory (VmHWM) and how long it took to spool everything.

    .venv/bin/python bench/many_files.py [--files 1000] [--mb 1]
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
from bench.fail2ban_log import SEED_SCHEMA, count_kept, lines  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.agentproc import write_config  # noqa: E402

TARGET_MIB = 64


def write_logs(folder: Path, files: int, size: int) -> int:
    """`files` logs of about `size` bytes each; return the documents the seed's filter keeps.

    Each file starts with its own line, so no two share a fingerprint: files that start alike
    would be taken for copies of one another and read one after the other."""
    body = bytearray()
    for text in lines(10 * size // 90):
        body += (text + "\n").encode()
        if len(body) >= size:
            break
    template = folder / "template"
    template.write_bytes(body)
    kept = count_kept(template)
    template.unlink()
    for n in range(files):
        (folder / f"app-{n:05d}.log").write_bytes(f"file {n} of {files} starts\n".encode() + body)
    return kept * files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=1.0, help="backlog per file, in MB")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        kept = write_logs(logs, args.files, int(args.mb * 1_000_000))
        # A port that was free a moment ago: nothing listens there.
        config = write_config(work / "etc", f"http://127.0.0.1:{free_port()}", [{
            "name": "fail2ban", "paths": [str(logs / "*.log")], "include": ["NOTICE", "Ban"],
            "schema": SEED_SCHEMA, "fields": {"machine": "server"}}],
            spool={"max_bytes": "64GiB"}, log={"level": "warning"})
        started = time.monotonic()
        with agent_running(config, stop_timeout=300,
                           stderr=open(work / "agent.log", "wb")) as agent:
            spooled = wait_spooled(agent, work / "etc" / "state", kept, work / "agent.log",
                                   args.timeout)
            elapsed = time.monotonic() - started
            memory = memory_mib(agent.pid)
            cpu = cpu_seconds(agent.pid)
    result = {"files": args.files, "mb_per_file": args.mb, "documents_spooled": spooled,
              "seconds": round(elapsed, 1), "cpu_s": round(cpu, 1),
              "peak_rss_mib": round(memory["VmHWM"], 1), "rss_mib": round(memory["VmRSS"], 1),
              "target_mib": TARGET_MIB}
    print(json.dumps(result))
    print(f"{args.files} files x {args.mb} MB with CouchDB down: {spooled} documents spooled in "
          f"{result['seconds']} s; peak RSS {result['peak_rss_mib']} MiB (target <= {TARGET_MIB})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
