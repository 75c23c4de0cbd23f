"""Issue 5's harness: the agent beside syslog-ng on the same jobs, and beside a plain bulk
loader on a real CouchDB-API server; prints the figures as a table.

    scripts/bench                      # everything, as in README's Performance section
    .venv/bin/python bench/run.py --only throughput latency --runs 3

Sections (each names its own command-line knobs):

- throughput: a generated 1M-line fail2ban log (96 MB, ~700k documents) shipped by each peer
  into the nginx sink; wall seconds until the last document was answered, CPU seconds, peak
  RSS, lines/s; medians of --runs interleaved runs; every document checked to have arrived
  exactly once (the multiset of received documents against one written out from the log).
- latency: a writer appends stamped lines at a steady 1k and 10k lines/s for
  --latency-seconds; p50/p99 of (request answered - line written) over every document.
- idle: one file, and 1000 files (--files), of 3 lines each, followed; once all is shipped,
  CPU seconds over --idle-seconds of silence, and RSS. All four processes at once (they idle).
- catchup: a ~1 GB backlog (--catchup-lines) shipped from a cold start.
- backend: the agent against the test backend (pouchdb-server; COUCHDB_URL if set) beside a
  plain loader posting the same documents, already encoded, in batches of 1000.
- durability: the spool's and the state file's writes timed with and without fsync.

Needs root the first time: it installs Debian's nginx, its njs module and syslog-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.offsets import StateFile  # noqa: E402
from agent.spool import Spool  # noqa: E402
from backend.pouchdb_server import PouchDBServer  # noqa: E402
from bench import ship_speed  # noqa: E402
from bench.fail2ban_log import count_kept, seed_keeps  # noqa: E402
from bench.fail2ban_log import lines as fail2ban_lines  # noqa: E402
from bench.parse_speed import workload  # noqa: E402
from bench.peers import (  # noqa: E402
    PEERS,
    Peer,
    Sink,
    Usage,
    expected_documents,
    install,
    settle,
    ship,
    verify,
    wait_received,
)
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.couch import CouchDB  # noqa: E402

SECTIONS = ("throughput", "latency", "idle", "catchup", "backend", "durability")
Report = list[str]


def throughput(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    log = workload(args.lines)
    expected = expected_documents([log])
    runs: dict[str, list[Usage]] = {peer.name: [] for peer in PEERS}
    for run in range(args.runs):
        for peer in PEERS:
            usage = ship(peer, str(log), expected, work / f"throughput-{run}-{peer.slug}")
            runs[peer.name].append(usage)
            progress(f"throughput run {run + 1}/{args.runs} {peer.name}: {usage.wall:.2f} s wall, "
                     f"{usage.cpu:.2f} s CPU, {usage.peak_rss:.0f} MiB")
    medians = {name: Usage(*(statistics.median(getattr(u, f) for u in usages)
                             for f in ("wall", "cpu", "peak_rss")))
               for name, usages in runs.items()}
    agent, peer = medians["agent"], medians[PEERS[1].name]
    report += [
        f"### Throughput: {args.lines:,} lines ({log.stat().st_size / 1e6:.0f} MB) -> "
        f"{sum(expected.values()):,} documents, each received exactly once; median of "
        f"{args.runs} interleaved runs", "",
        "| peer | wall s | CPU s | peak RSS MiB | lines/s |", "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {u.wall:.2f} | {u.cpu:.2f} | {u.peak_rss:.1f} | {args.lines / u.wall:,.0f} |"
          for name, u in medians.items()),
        f"| **agent / {PEERS[1].name}** | **{agent.wall / peer.wall:.2f}** | "
        f"**{agent.cpu / peer.cpu:.2f}** | **{agent.peak_rss / peer.peak_rss:.2f}** | |", ""]
    return {name: dataclasses.asdict(u) for name, u in medians.items()}


def latency(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    rows, results = [], {}
    for rate in args.rates:
        for peer in PEERS:
            p50, p99, docs = measure_latency(peer, rate, args.latency_seconds,
                                             work / f"latency-{rate}-{peer.slug}")
            results[f"{peer.name} {rate}"] = {"p50": p50, "p99": p99, "documents": docs}
            rows.append(f"| {peer.name} | {rate:,} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | {docs:,} |")
            progress(f"latency {peer.name} at {rate} lines/s: p50 {p50 * 1000:.0f} ms, "
                     f"p99 {p99 * 1000:.0f} ms over {docs} documents")
    report += [f"### Latency: line written -> its batch answered, steady rate for "
               f"{args.latency_seconds:.0f} s", "",
               "| peer | lines/s | p50 ms | p99 ms | documents |", "| --- | ---: | ---: | ---: | ---: |",
               *rows, ""]
    return results


def measure_latency(peer: Peer, rate: int, seconds: float, work: Path) -> tuple[float, float, int]:
    logs = work / "logs"
    logs.mkdir(parents=True)
    log = logs / "live.log"
    log.touch()
    sink = Sink(work / "sink", bodies=True)
    try:
        process = peer.start(str(log), sink.url, work / "peer")
        try:
            time.sleep(3)  # started and following, so startup is not counted as latency
            subprocess.run([sys.executable, str(ROOT / "bench" / "fail2ban_log.py"), "--live",
                            "--lines", str(int(rate * seconds)), "--rate", str(rate),
                            "--out", str(log)], check=True)
            expected = expected_documents([log])
            wait_received(sink, process, sum(expected.values()), timeout=120)
            settle(sink, sum(expected.values()))
        finally:
            process.terminate()
            process.wait(60)
        verify(sink, expected)
        delays = [answered - written_at(doc) for answered, doc in sink.documents()]
    finally:
        sink.stop()
    cuts = statistics.quantiles(delays, n=100)
    return cuts[49], cuts[98], len(delays)


def written_at(doc: dict[str, Any]) -> float:
    """The write time a live line carries in its stamp (UTC, milliseconds)."""
    stamp = f"{doc['date']} {doc['hour']}" if "hour" in doc else doc["message"][:23]
    seconds, _, millis = stamp.partition(",")
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def idle(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    """One file, and --files files, each followed by both peers: four idle processes at once."""
    scenarios = {count: idle_logs(work / f"idle-logs-{count}", count) for count in (1, args.files)}
    running: list[tuple[int, Peer, Sink, subprocess.Popen[bytes]]] = []
    results: dict[str, Any] = {}
    try:
        for count, (logs, _) in scenarios.items():
            for peer in PEERS:
                sink = Sink(work / f"idle-sink-{count}-{peer.slug}", bodies=True)
                running.append((count, peer, sink, peer.start(
                    str(logs / "*.log"), sink.url, work / f"idle-{count}-{peer.slug}")))
        for count, _, sink, process in running:
            wait_received(sink, process, sum(scenarios[count][1].values()), timeout=600)
        time.sleep(5)
        before = [cpu_seconds(process.pid) for _, _, _, process in running]
        time.sleep(args.idle_seconds)
        for (count, peer, sink, process), cpu_before in zip(running, before, strict=True):
            cpu = cpu_seconds(process.pid) - cpu_before
            memory = memory_mib(process.pid)
            settle(sink, sum(scenarios[count][1].values()))
            verify(sink, scenarios[count][1])
            results[f"{peer.name}, {count} files"] = {
                "peer": peer.name, "files": count, "cpu_s_per_min": cpu * 60 / args.idle_seconds,
                "rss": memory["VmRSS"], "peak_rss": memory["VmHWM"]}
            progress(f"idle {peer.name} with {count} files: {cpu:.3f} CPU s over "
                     f"{args.idle_seconds:.0f} s, RSS {memory['VmRSS']:.1f} MiB")
    finally:
        for _, _, sink, process in running:
            process.terminate()
            process.wait(60)
            sink.stop()
    report += [f"### Idle: files followed (3 lines each, all shipped), then {args.idle_seconds:.0f} s "
               "without a write", "",
               "| peer | files | CPU s per minute | RSS MiB | peak RSS MiB |",
               "| --- | ---: | ---: | ---: | ---: |",
               *(f"| {r['peer']} | {r['files']:,} | {r['cpu_s_per_min']:.3f} | {r['rss']:.1f} | "
                 f"{r['peak_rss']:.1f} |" for r in results.values()), ""]
    return results


def idle_logs(folder: Path, files: int) -> tuple[Path, Counter[bytes]]:
    """`files` logs of three Ban lines each, and the documents they make."""
    folder.mkdir()
    bans = (line for line in fail2ban_lines(files * 10) if seed_keeps(line))
    for i in range(files):
        (folder / f"f{i:04d}.log").write_text("".join(next(bans) + "\n" for _ in range(3)))
    return folder, expected_documents(sorted(folder.glob("*.log")))


def catchup(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    log = workload(args.catchup_lines)
    count = count_kept(log)
    results = {}
    for peer in PEERS:
        usage = ship(peer, str(log), count, work / f"catchup-{peer.slug}")
        results[peer.name] = dataclasses.asdict(usage)
        progress(f"catch-up {peer.name}: {usage.wall:.1f} s, {usage.cpu:.1f} CPU s, "
                 f"{usage.peak_rss:.0f} MiB")
    size = log.stat().st_size
    report += [f"### Catch-up: a {size / 1e9:.2f} GB backlog ({args.catchup_lines:,} lines, "
               f"{count:,} documents) from a cold start; one run, counted at the sink", "",
               "| peer | wall s | MB/s | CPU s | peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: |",
               *(f"| {name} | {r['wall']:.1f} | {size / 1e6 / r['wall']:.1f} | {r['cpu']:.1f} | "
                 f"{r['peak_rss']:.1f} |" for name, r in results.items()), ""]
    return results


def backend(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    log = workload(args.backend_lines)
    bodies = ship_speed.loader_bodies(log, batch=1000)
    docs = sum(body.count(b'"_id"') for body in bodies)
    url = os.environ.get("COUCHDB_URL")
    server = None if url else PouchDBServer(work / "couchdb")
    if server is not None:
        server.start()
        url = server.url
    assert url is not None
    try:
        couch = CouchDB(url)
        loader_runs, agent_runs = [], []
        for run in range(args.backend_runs):
            loader_runs.append(asyncio.run(ship_speed.plain_load(url, bodies, "log_bench_loader", couch)))
            agent_runs.append(ship_speed.agent_run(url, couch, log, "log_bench_agent", 1000,
                                                   work / f"backend-{run}")[0])
            progress(f"backend run {run + 1}: loader {loader_runs[-1]:.2f} s, "
                     f"agent {agent_runs[-1]:.2f} s")
        couch.delete_db("log_bench_loader")
        couch.delete_db("log_bench_agent")
    finally:
        if server is not None:
            server.stop()
    loader, agent = statistics.median(loader_runs), statistics.median(agent_runs)
    name = "COUCHDB_URL" if server is None else "pouchdb-server 4.2.0 (the test backend)"
    report += [f"### Real backend: {name}, {args.backend_lines:,} lines -> {docs:,} documents; "
               f"median of {args.backend_runs} interleaved runs", "",
               "| shipper | wall s | docs/s | share of the loader's rate |",
               "| --- | ---: | ---: | ---: |",
               f"| plain bulk loader | {loader:.2f} | {docs / loader:,.0f} | 1.00 |",
               f"| agent | {agent:.2f} | {docs / agent:,.0f} | {loader / agent:.2f} |", ""]
    return {"loader_s": loader, "agent_s": agent, "share": loader / agent}


def durability(args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    """What fsync costs where the agent keeps it: the spool (every batch written to it) and the
    offsets state file (at most once a second). The same code timed with os.fsync a no-op."""
    docs = ship_speed.workload_documents(workload(args.backend_lines))
    batches = [docs[i:i + 1000] for i in range(0, len(docs), 1000)]
    snapshot = {"version": 1, "files": {f"s/{i:x}.{i:x}.{'ab' * 8}": {
        "path": f"/var/log/f{i}.log", "offset": i * 1000, "updated": 0.0, "marker_offset": 0,
        "marker": None, "delivered": None} for i in range(args.files)}}
    results: dict[str, Any] = {}
    for durable in (True, False):
        with contextlib.ExitStack() as stack:
            if not durable:
                stack.enter_context(mock.patch("os.fsync"))
            folder = work / f"durability-{durable}"
            spool = Spool(folder / "spool", 1 << 40, 64 << 20)
            spool.open()
            started = time.perf_counter()
            for batch in batches:
                spool.append(batch)
            spool_s = time.perf_counter() - started
            spool.close()
            state = StateFile(folder / "state")
            state.path.parent.mkdir(parents=True)
            started = time.perf_counter()
            for _ in range(20):
                state.save(snapshot)
            save_ms = (time.perf_counter() - started) / 20 * 1000
        results["fsync" if durable else "no fsync"] = {"spool_docs_per_s": len(docs) / spool_s,
                                                       "state_save_ms": save_ms}
    report += [f"### Durability: fsync kept, and what it costs ({len(docs):,} documents spooled "
               f"in batches of 1000; a state file of {args.files:,} files saved 20 times)", "",
               "| | spool docs/s | state save ms |", "| --- | ---: | ---: |",
               *(f"| {name} | {r['spool_docs_per_s']:,.0f} | {r['state_save_ms']:.1f} |"
                 for name, r in results.items()), ""]
    return results


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, Report], dict[str, Any]]] = {
    "throughput": throughput, "latency": latency, "idle": idle, "catchup": catchup,
    "backend": backend, "durability": durability}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--lines", type=int, default=1_000_000, help="throughput workload")
    parser.add_argument("--runs", type=int, default=5, help="interleaved throughput runs")
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--catchup-lines", type=int, default=10_500_000, help="~1 GB")
    parser.add_argument("--backend-lines", type=int, default=100_000)
    parser.add_argument("--backend-runs", type=int, default=5)
    args = parser.parse_args()
    install()
    report: Report = [f"## couchlog agent benchmarks ({time.strftime('%Y-%m-%d')}, "
                      f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]})", ""]
    results = {}
    with tempfile.TemporaryDirectory(prefix="couchlog-bench-") as tmp:
        for section in SECTIONS:
            if section in args.only:
                results[section] = RUNNERS[section](args, Path(tmp), report)
    out = ROOT / "bench" / "out" / "results.json"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
