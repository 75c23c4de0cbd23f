"""Lines per second of `agent parse` on a generated fail2ban log, against awk doing the same job.

Both keep NOTICE+Ban lines, split them into the seed's fields, add machine=server and print one
JSON object per line to /dev/null. Runs are interleaved; medians are printed.

    .venv/bin/python bench/parse_speed.py [--lines 1000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fail2ban_log import SEED_SCHEMA, lines  # noqa: E402

AWK = r"""/NOTICE/ && /Ban/ {
  if ($3 == "fail2ban.actions" && $6 ~ /^\[.*\]$/) {
    p = substr($6, 2, length($6) - 2)
    printf "{\"date\":\"%s\",\"hour\":\"%s\",\"process\":\"%s\",", $1, $2, p
    printf "\"ip\":\"%s\",\"machine\":\"server\"}\n", $8
  } else { printf "{\"message\":\"%s\",\"machine\":\"server\"}\n", $0 }
}"""


def workload(count: int) -> Path:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"fail2ban-{count}.log"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", buffering=1024 * 1024) as f:
            for text in lines(count):
                f.write(text + "\n")
        tmp.rename(path)
    return path


def timed(command: list[str], source: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run, output to /dev/null."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with source.open("rb") as stdin, open(os.devnull, "wb") as devnull:
        subprocess.run(command, stdin=stdin, stdout=devnull, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    log = workload(args.lines)
    agent = [sys.executable, "-m", "agent", "parse", "--schema", SEED_SCHEMA,
             "--include", "NOTICE", "--include", "Ban", "--fields", "machine=server"]
    awk_binary = shutil.which("mawk") or shutil.which("awk") or "awk"
    peers = {"agent parse": agent, f"{Path(awk_binary).name} (same job)": [awk_binary, AWK]}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    for _ in range(args.runs):
        for name, command in peers.items():
            results[name].append(timed(command, log))
    print(f"workload: {args.lines} lines, {log.stat().st_size / 1e6:.0f} MB ({log}); "
          f"median of {args.runs} interleaved runs")
    print(f"{'':24} {'wall s':>8} {'CPU s':>8} {'lines/s':>12}")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        medians[name] = wall
        print(f"{name:24} {wall:8.2f} {cpu:8.2f} {args.lines / wall:12,.0f}")
    agent_wall, peer_wall = medians["agent parse"], list(medians.values())[1]
    print(f"agent/awk wall-time ratio: {agent_wall / peer_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
