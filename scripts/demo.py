"""The demo: a local CouchDB-compatible server, `agent run` following a fail2ban log that grows
while it runs, then a map/reduce report of what was stored.

Everything lives in ./demo-run (deleted and made anew each time). Run it through `scripts/demo`,
which installs what it needs first.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import ADMIN, PouchDBServer  # noqa: E402
from bench import fail2ban_log  # noqa: E402

RUN = ROOT / "demo-run"
DATABASE = "log_fail2ban"
LINES = 3000
RATE = 1000.0
REPORT_VIEWS = {
    "_id": "_design/report",
    "language": "javascript",
    "views": {
        # The seed's view: [machine, year, month, day] with _count; group_level 1 is the total
        # per machine, 4 the total per day.
        "by_day": {"map": "function (doc) { if (doc.date && doc.machine) { var d = doc.date.split('-');"
                          " emit([doc.machine, +d[0], +d[1], +d[2]], 1); } }",
                   "reduce": "_count"},
        "by_jail": {"map": "function (doc) { if (doc.process) { emit(doc.process, 1); } }",
                    "reduce": "_count"},
        "by_ip": {"map": "function (doc) { if (doc.ip) { emit(doc.ip, 1); } }", "reduce": "_count"},
        "parse_errors": {"map": "function (doc) { if (doc.agent && doc.agent.parse_error) "
                                "{ emit(doc.agent.offset, doc.message); } }",
                         "reduce": "_count"},
    },
}


def call(server: PouchDBServer, method: str, path: str, body: Any = None) -> Any:
    token = base64.b64encode(f"{ADMIN}:{server.password}".encode()).decode()
    request = urllib.request.Request(
        server.public_url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"null")


def write_config(server: PouchDBServer, log_path: Path) -> Path:
    etc = RUN / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "agent.yaml").write_text(f"""\
couchdb:
  url: {server.public_url}
  username: {ADMIN}
  password: {server.password}
state_dir: {RUN / "state"}
shipping:
  linger: 100ms
""")
    (etc / "conf.d" / "fail2ban.yaml").write_text(f"""\
name: fail2ban
paths: [{log_path}]
include: [NOTICE, Ban]
schema: '{fail2ban_log.SEED_SCHEMA}'
fields: {{machine: server}}
""")
    return etc / "agent.yaml"


def expected_documents(log_path: Path) -> int:
    return fail2ban_log.count_kept(log_path)


def grow_log(log_path: Path) -> None:
    rng = random.Random(7)
    started = time.monotonic()
    with log_path.open("a", buffering=1) as log:
        for index in range(LINES):
            log.write(fail2ban_log.line(rng, index) + "\n")
            ahead = (index + 1) / RATE - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def wait_for_documents(server: PouchDBServer, want: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = call(server, "GET", f"/{DATABASE}").get("doc_count", 0)
        if count >= want:
            break
        time.sleep(0.2)
    return int(count)


def report(server: PouchDBServer) -> None:
    call(server, "PUT", f"/{DATABASE}/_design/report", REPORT_VIEWS)
    view = f"/{DATABASE}/_design/report/_view"
    total = call(server, "GET", f"{view}/by_day?group_level=1")["rows"]
    days = call(server, "GET", f"{view}/by_day?group_level=4")["rows"]
    jails = call(server, "GET", f"{view}/by_jail?group=true")["rows"]
    ips = call(server, "GET", f"{view}/by_ip?group=true")["rows"]
    errors = call(server, "GET", f"{view}/parse_errors")["rows"]
    print("\nReport (CouchDB map/reduce views in _design/report):")
    for row in total:
        print(f"  bans on {row['key'][0]}: {row['value']}")
    for row in days:
        _, year, month, day = row["key"]
        print(f"    {year}-{month:02d}-{day:02d}: {row['value']}")
    print("  bans per jail:")
    for row in sorted(jails, key=lambda r: -r["value"]):
        print(f"    {row['key']:18} {row['value']}")
    top = sorted(ips, key=lambda r: -r["value"])[:3]
    print("  most banned IPs: " + ", ".join(f"{r['key']} ({r['value']})" for r in top))
    print(f"  lines shipped raw with a parse_error marker: {errors[0]['value'] if errors else 0}")


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    (RUN / "log").mkdir(parents=True)
    log_path = RUN / "log" / "fail2ban.log"
    log_path.touch()
    with PouchDBServer(RUN / "couchdb") as server:
        print(f"CouchDB-compatible server (pouchdb-server) on {server.public_url}, data in {RUN}")
        config = write_config(server, log_path)
        agent_log = (RUN / "agent.log").open("wb")
        agent = subprocess.Popen([str(ROOT / ".venv/bin/agent"), "run", "-c", str(config)],
                                 stdout=agent_log, stderr=agent_log)
        try:
            print(f"agent run -c {config}  (its log: {RUN / 'agent.log'})")
            print(f"writing {LINES} fail2ban lines to {log_path} at {RATE:.0f} lines/s ...")
            grow_log(log_path)
            want = expected_documents(log_path)
            got = wait_for_documents(server, want)
            print(f"{LINES} lines written, {want} kept by the filter (NOTICE and Ban); "
                  f"{got} documents in {DATABASE}")
            time.sleep(2.5)  # the next status snapshot
            status = subprocess.run([str(ROOT / ".venv/bin/agent"), "status", "-c", str(config)],
                                    capture_output=True, text=True)
            print(f"\n$ agent status -c {config}\n{status.stdout}")
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=30)
            agent_log.close()
        print(f"agent stopped (exit code {code}); offsets saved in {RUN / 'state/offsets.json'}")
        sample = call(server, "GET", f"/{DATABASE}/_all_docs?include_docs=true&limit=1")["rows"]
        print("\nOne stored document:\n" + json.dumps(sample[0]["doc"], indent=2))
        report(server)
        return 0 if got == want and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
