"""`agent run` through the nginx front with TLS, against straight to the backend: one ratio.

Both runs ship the same generated fail2ban log (the seed's filter and schema) as the same agent
user into a database prepared by `agent setup` (members, validate_doc_update), so the only
difference is the front: Debian's nginx on loopback, TLS with a throwaway CA, the maps, the
proxy hop. The figure is the front's throughput over the direct one, from one run of each;
issue 10 asks for at least 0.9. Results go to bench/out/front.json.

    .venv/bin/python bench/front.py [--lines 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import free_port  # noqa: E402
from bench.common import agent_running, couchdb_url, wait_stored  # noqa: E402
from bench.fail2ban_log import SEED_SCHEMA, count_kept  # noqa: E402
from bench.parse_speed import workload  # noqa: E402
from tests.agentproc import write_config  # noqa: E402
from tests.backendsetup import account, backend_address, delete_users, run_agent  # noqa: E402
from tests.couch import CouchDB  # noqa: E402
from tests.nginx import NGINX, Nginx, make_certificates  # noqa: E402


def timed_run(url: str, user: tuple[str, str], couch: CouchDB, log: Path, database: str,
              work: Path, env: dict[str, str]) -> float:
    """Wall seconds from the agent's start until every kept line is stored."""
    kept = count_kept(log)
    config = write_config(work / f"etc-{database}", url, [{
        "name": "fail2ban", "database": database, "paths": [str(log)], "include": ["NOTICE", "Ban"],
        "schema": SEED_SCHEMA, "fields": {"machine": "server"}}],
        couchdb={"username": user[0], "password": user[1]}, log={"level": "warning"})
    started = time.monotonic()
    with agent_running(config, env={**os.environ, **env}) as agent:
        wait_stored(couch, database, kept, agent)
        return time.monotonic() - started


def measure(url: str, work: Path, log: Path) -> tuple[float, float]:
    """Seconds to ship `log` straight to `url`, then through nginx with TLS in front of it."""
    couch = CouchDB(url)
    agent, public = account(work / "secrets", "bench_agent"), account(work / "secrets", "bench_pub")
    direct_db, front_db = (f"log_bench_{kind}_{secrets.token_hex(3)}" for kind in ("direct", "front"))
    nginx = None
    try:
        for db in (direct_db, front_db):
            done = run_agent("setup", "--url", url, "--db", db, "--agent-user", agent.name,
                             "--agent-password-file", str(agent.password_file),
                             "--public-user", public.name,
                             "--public-password-file", str(public.password_file))
            assert done.returncode == 0, done.stderr
        certs = make_certificates(work / "tls")
        https_port = free_port()
        upstream, bare = backend_address(url)
        conf = work / "couchlog.conf"
        rendered = run_agent("setup", "--nginx", "--server-name", "localhost", "--cert",
                             str(certs.cert), "--key", str(certs.key), "--bind", "127.0.0.1",
                             "--http-port", str(free_port()), "--https-port", str(https_port),
                             "--upstream", upstream, "--public-user", public.name,
                             "--public-password-file", str(public.password_file), "-o", str(conf))
        assert rendered.returncode == 0, rendered.stderr
        nginx = Nginx(work / "nginx", conf)
        nginx.start(https_port)
        user = (agent.name, agent.password)
        direct = timed_run(bare, user, couch, log, direct_db, work, {})
        # SSL_CERT_FILE: the agent verifies the front against the test CA (as couchdb.ca_file does).
        front = timed_run(f"https://127.0.0.1:{https_port}", user, couch, log, front_db, work,
                          {"SSL_CERT_FILE": str(certs.ca)})
    finally:
        if nginx is not None:
            nginx.stop()
        couch.delete_db(direct_db)
        couch.delete_db(front_db)
        delete_users(couch, agent.name, public.name)
    return direct, front


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    if NGINX is None:
        print("bench/front.py: nginx is not installed (scripts/setup installs it)", file=sys.stderr)
        return 1
    log = workload(args.lines)
    docs = count_kept(log)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with couchdb_url(work / "couchdb") as (url, server):
            direct, front = measure(url, work, log)
    ratio = direct / front
    backend = "COUCHDB_URL" if server is None else "pouchdb-server"
    print(f"workload: {args.lines} lines -> {docs} documents; {backend}; one run each")
    print(f"straight to the backend: {direct:6.2f} s  {docs / direct:9,.0f} docs/s")
    print(f"through nginx with TLS:  {front:6.2f} s  {docs / front:9,.0f} docs/s")
    print(f"front / direct throughput: {ratio:.2f} (issue 10 asks for >= 0.9)")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "front.json").write_text(json.dumps({
        "lines": args.lines, "documents": docs, "backend": backend, "direct_s": round(direct, 3),
        "front_s": round(front, 3), "ratio": round(ratio, 3)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
