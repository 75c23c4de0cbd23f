"""Join CouchDB nodes into one cluster through `_cluster_setup` (the cluster profile's step).

    python3 cluster_join.py FIRST_HOST OTHER_HOST...

Admin from COUCHDB_USER / COUCHDB_PASSWORD. Every node waits for /_up; the first node enables
the cluster, adds the others and finishes it. Nothing is done when /_membership already lists
every node, so the service may run again. `_cluster_setup` refuses a loopback bind_address:
the nodes bind 0.0.0.0 on the container network (couchdb/couchlog.ini).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

PORT = 5984


def call(host: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    token = base64.b64encode(f"{os.environ['COUCHDB_USER']}:{os.environ['COUCHDB_PASSWORD']}"
                             .encode()).decode()
    request = urllib.request.Request(
        f"http://{host}:{PORT}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_up(host: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call(host, "GET", "/_up")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"cluster_join: {host} did not answer /_up within {timeout:.0f}s")
        time.sleep(2)


def must(host: str, body: dict[str, Any]) -> None:
    status, answer = call(host, "POST", "/_cluster_setup", body)
    if status not in (200, 201):
        sys.exit(f"cluster_join: {body['action']} on {host}: HTTP {status} "
                 f"{(answer or {}).get('error', '')}")


def main(hosts: list[str]) -> int:
    first, others = hosts[0], hosts[1:]
    for host in hosts:
        wait_up(host)
    _, membership = call(first, "GET", "/_membership")
    wanted = {f"couchdb@{host}" for host in hosts}
    if wanted <= set((membership or {}).get("cluster_nodes", [])):
        print(f"cluster_join: {len(hosts)} nodes already joined")
        return 0
    user, password = os.environ["COUCHDB_USER"], os.environ["COUCHDB_PASSWORD"]
    common = {"bind_address": "0.0.0.0", "username": user, "password": password,
              "port": PORT, "node_count": str(len(hosts))}
    must(first, {"action": "enable_cluster", **common})
    for host in others:
        must(first, {"action": "enable_cluster", **common, "remote_node": host,
                     "remote_current_user": user, "remote_current_password": password})
        must(first, {"action": "add_node", "host": host, "port": PORT, "username": user,
                     "password": password})
    must(first, {"action": "finish_cluster"})
    print(f"cluster_join: joined {', '.join(hosts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
