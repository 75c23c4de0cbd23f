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
READER, READER_PASSWORD = "demo_reader", "demo-reader-pw"


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


def agent_report(server: PouchDBServer, user: str, password: str, *args: str) -> str:
    """`agent report ...` as a user would type it; its output (the command line is printed too)."""
    secret = RUN / "etc" / f"{user}.password"
    secret.write_text(password + "\n")
    command = ["agent", "report", *args, "--url", server.public_url, "--user", user,
               "--password-file", str(secret)]
    done = subprocess.run([str(ROOT / ".venv/bin/agent"), *command[1:]], capture_output=True,
                          text=True)
    return f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"


def report(server: PouchDBServer) -> None:
    """The shipped reports (agent/reports/) and the dashboard, through `agent report` only."""
    call(server, "PUT", f"/_users/org.couchdb.user:{READER}", {
        "_id": f"org.couchdb.user:{READER}", "name": READER, "password": READER_PASSWORD,
        "roles": ["couchlog_reader"], "type": "user"})
    call(server, "PUT", f"/{DATABASE}/_security", {
        "admins": {"names": [], "roles": []}, "members": {"names": [], "roles": ["couchlog_reader"]}})
    print("\n" + agent_report(server, ADMIN, server.password, "--install", "--dashboard",
                              "--db", DATABASE))
    print(agent_report(server, READER, READER_PASSWORD, "attacks", "--group-level", "1",
                       "--db", DATABASE, "--format", "table"))
    print(agent_report(server, READER, READER_PASSWORD, "attacks", "--group-level", "4",
                       "--db", DATABASE, "--format", "table"))
    print(agent_report(server, READER, READER_PASSWORD, "attacks_per_ip", "--top", "5",
                       "--db", DATABASE, "--format", "table"))
    print(agent_report(server, READER, READER_PASSWORD, "parse_errors", "--group-level", "0",
                       "--db", DATABASE, "--format", "table"))
    print(f"""The dashboard is stored in CouchDB itself. To open it, start the server on the demo's
data and browse to it (log in as {READER} / {READER_PASSWORD}, database {DATABASE}):

  .venv/bin/python backend/pouchdb_server.py --port {server.port} --data {RUN / "couchdb"}
  http://127.0.0.1:{server.port}/couchlog_dashboard/_design/dashboard/index.html

Behind the nginx front it is at https://FRONT/dashboard/.""")


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
