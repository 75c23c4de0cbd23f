"""Shipping throughput against a real CouchDB-API server, beside a plain bulk loader.

The workload: a generated fail2ban log (the seed's filter, schema and `machine=server`). The
agent ships it with `agent run` into an empty database; the peer, in the same run, is a plain
loader that POSTs the same documents, already encoded, in `_bulk_docs` batches of 500 over one
keep-alive connection: what the server can take. Both are timed until the last document is
stored; runs are interleaved, medians printed. With --batch, each batch size is measured.

    .venv/bin/python bench/ship_speed.py [--lines 100000] [--runs 3] [--batch 250 500 1000 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import Problem, source_from_mapping  # noqa: E402
from agent.couchdb import basic_auth  # noqa: E402
from agent.counters import SourceCounters  # noqa: E402
from agent.lines import LineSplitter  # noqa: E402
from agent.parser import LineContext, SourceParser  # noqa: E402
from agent.types import Document, FileId, SourceFile  # noqa: E402
from bench.common import agent_running, couchdb_url, wait_stored  # noqa: E402
from bench.fail2ban_log import SEED_SCHEMA, count_kept  # noqa: E402
from bench.parse_speed import workload  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.agentproc import write_config  # noqa: E402
from tests.couch import CouchDB  # noqa: E402


def agent_run(url: str, couch: CouchDB, log: Path, database: str, batch: int,
              work: Path) -> tuple[float, float, float]:
    """Wall seconds until every document is stored, CPU seconds, peak RSS MiB."""
    couch.delete_db(database)
    couch.create_db(database)
    kept = count_kept(log)
    config = write_config(work / f"etc-{batch}-{time.monotonic_ns()}", url, [{
        "name": "fail2ban", "database": database, "paths": [str(log)], "include": ["NOTICE", "Ban"],
        "schema": SEED_SCHEMA, "fields": {"machine": "server"}}],
        shipping={"batch_max_docs": batch, "linger": "50ms"}, log={"level": "warning"})
    started = time.monotonic()
    with agent_running(config) as agent:
        wait_stored(couch, database, kept, agent)
        wall = time.monotonic() - started
        cpu, rss = cpu_seconds(agent.pid), memory_mib(agent.pid)["VmHWM"]
    return wall, cpu, rss


def workload_documents(log: Path) -> list[Document]:
    """The documents the agent makes of `log`, made by its own parser (untimed)."""
    problems: list[Problem] = []
    source = source_from_mapping("bench", {"name": "load", "paths": [str(log)], "schema": SEED_SCHEMA,
                                           "include": ["NOTICE", "Ban"], "fields": {"machine": "server"}},
                                 problems)
    assert source is not None and not problems
    parser = SourceParser(source, "bench", SourceCounters())
    context = LineContext(SourceFile("load", FileId(1, 1, "bench")), str(log), "2026-01-01T00:00:00Z")
    return parser.documents(LineSplitter(source.max_line_bytes).feed(log.read_bytes()), context)


def loader_bodies(log: Path, batch: int = 500) -> list[bytes]:
    """The agent's documents of `log` as `_bulk_docs` bodies of `batch` documents."""
    docs = [d.body for d in workload_documents(log)]
    return [b'{"docs":[' + b",".join(docs[i:i + batch]) + b"]}" for i in range(0, len(docs), batch)]


async def plain_load(url: str, bodies: list[bytes], database: str, couch: CouchDB) -> float:
    couch.delete_db(database)
    couch.create_db(database)
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if parts.username is not None:
        headers.update(basic_auth(unquote(parts.username), unquote(parts.password or "")))
        url = f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path.rstrip('/')}"
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(f"{url}/{database}/_bulk_docs", data=body,
                                    headers=headers) as response:
                await response.read()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="*", default=[1000])
    args = parser.parse_args()
    log = workload(args.lines)
    bodies = loader_bodies(log)
    docs = sum(body.count(b'"_id"') for body in bodies)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with couchdb_url(work / "couchdb") as (url, server):
            couch = CouchDB(url)
            agent_runs: dict[int, list[tuple[float, float, float]]] = {b: [] for b in args.batch}
            loader_runs = []
            for _ in range(args.runs):
                loader_runs.append(asyncio.run(plain_load(url, bodies, "log_bench_loader", couch)))
                for batch in args.batch:
                    agent_runs[batch].append(agent_run(url, couch, log, "log_bench_agent", batch, work))
            couch.delete_db("log_bench_loader")
            couch.delete_db("log_bench_agent")
    loader = statistics.median(loader_runs)
    backend = "COUCHDB_URL" if server is None else "pouchdb-server"
    print(f"workload: {args.lines} lines -> {docs} documents; {backend}; "
          f"median of {args.runs} interleaved runs")
    print(f"{'':22} {'wall s':>7} {'docs/s':>9} {'CPU s':>7} {'peak RSS MiB':>13} {'vs loader':>10}")
    print(f"{'plain bulk loader':22} {loader:7.2f} {docs / loader:9,.0f} {'':>7} {'':>13} {1:10.2f}")
    for batch, runs in agent_runs.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        rss = statistics.median(r[2] for r in runs)
        print(f"{'agent, batch ' + str(batch):22} {wall:7.2f} {docs / wall:9,.0f} {cpu:7.2f} {rss:13.1f} "
              f"{loader / wall:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
