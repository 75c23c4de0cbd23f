"""Do reports keep up with ingest? View build times of the shipped reports beside the agent's rate.

    .venv/bin/python bench/views.py --docs 50000            # pouchdb-server started here
    COUCHDB_URL=http://admin:pw@host:5984 .venv/bin/python bench/views.py --docs 50000

1. `agent run` ships a generated fail2ban log of --docs kept lines into a fresh database: the
   agent's ingest rate (documents/s from start to the last document stored).
2. The shipped reports are installed; each view is queried once: the time to build it from
   nothing over those documents (views/s = documents / seconds).
3. The agent ships --more (10k) new documents; each view is queried again: the time to bring
   it up to date.

On CouchDB, the views of one design document share one index build, so its first view's time
covers all of them and the others answer from the built index. pouchdb-server builds each view
on its own. Prints a markdown table (README's "Reports at scale").
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.report import Couch, install_documents, load_designs  # noqa: E402
from bench import fail2ban_log  # noqa: E402
from bench.common import agent_running, couchdb_url, wait_stored  # noqa: E402
from tests.agentproc import write_config  # noqa: E402
from tests.couch import CouchDB  # noqa: E402


def kept_lines(count: int, seed: int, start: int) -> list[str]:
    """`count` lines that the seed's filter keeps, dated over a month so per-day views have rows."""
    rng = random.Random(seed * 7919 + start)
    out: list[str] = []
    index = start
    while len(out) < count:
        text = fail2ban_log.line(rng, index)
        index += 1
        if fail2ban_log.seed_keeps(text):
            out.append(f"2017-06-{1 + rng.randrange(30):02d}" + text[10:])
    return out


def time_views(reader: Couch, database: str) -> dict[str, float]:
    """Seconds of each view's first query after a change (the index brought up to date)."""
    out = {}
    for design in load_designs():
        for view in design.views:
            params = {"reduce": "true", "group_level": "0"} if view.reduce else {"limit": "1"}
            started = time.monotonic()
            reader.get(f"/{database}/_design/{design.name}/_view/{view.name}?{urlencode(params)}")
            out[f"{design.name}/{view.name}"] = time.monotonic() - started
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents before the build")
    parser.add_argument("--more", type=int, default=10000, help="documents added afterwards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="couchlog-views-") as tmp:
        work = Path(tmp)
        with couchdb_url(work / "server") as (url, server):
            return run(args, work, url.rstrip("/"), "CouchDB" if server is None else "pouchdb-server")


def run(args: argparse.Namespace, work: Path, url: str, backend: str) -> int:
    couch = CouchDB(url)
    parts = urlsplit(url)
    admin = Couch(f"{parts.scheme}://{parts.hostname}:{parts.port}", parts.username,
                  parts.password, timeout=3600)
    database = f"log_views_{uuid.uuid4().hex[:8]}"
    couch.create_db(database)
    log = work / "fail2ban.log"
    log.touch()
    source = {"name": "fail2ban", "database": database, "paths": [str(log)],
              "include": ["NOTICE", "Ban"], "schema": fail2ban_log.SEED_SCHEMA,
              "fields": {"machine": "server"}}
    config = write_config(work / "etc", url, [source], shipping={"linger": "200ms"})
    try:
        with agent_running(config, stdout=subprocess.DEVNULL,
                           stderr=open(work / "agent.log", "wb")) as agent:
            time.sleep(2)  # the agent's first scan
            started = time.monotonic()
            with log.open("a") as out:
                out.write("".join(t + "\n" for t in kept_lines(args.docs, 1, 0)))
            wait_stored(couch, database, args.docs, agent, 1800, poll=0.2)
            ingest = args.docs / (time.monotonic() - started)
            install_documents(admin, database, {d["_id"]: d for d in (
                x.document() for x in load_designs())})
            build = time_views(admin, database)
            with log.open("a") as out:
                out.write("".join(t + "\n" for t in kept_lines(args.more, 2, args.docs)))
            wait_stored(couch, database, args.docs + args.more, agent, 1800, poll=0.2)
            update = time_views(admin, database)
    finally:
        couch.delete_db(database)
    print(f"\n{backend}: {args.docs} documents, then {args.more} more; agent ingest "
          f"{ingest:,.0f} docs/s\n")
    print(f"| view | build from nothing (s) | views docs/s | update after +{args.more} (s) | "
          "update docs/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in build.items():
        print(f"| {name} | {seconds:.2f} | {args.docs / max(seconds, 1e-6):,.0f} | "
              f"{update[name]:.2f} | {args.more / max(update[name], 1e-6):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
