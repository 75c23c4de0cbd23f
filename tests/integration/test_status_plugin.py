"""`agent status` against the real agent: each exit code produced for real (OK, WARNING while
retrying, CRITICAL past status.critical_after, with the spool full and with recent dead letters,
UNKNOWN for a stuck or stopped agent), and every line written still stored exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.faults import failover_flow, flow_via, refuse_secrets
from tests.integration.harness import Pipeline, append, numbered

pytestmark = pytest.mark.integration

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


@pytest.fixture
def proxy(couchdb_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(couchdb_url, seed=12) as running:
        yield running


def status(flow: Pipeline) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "agent", "status", "-c", str(flow.config)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout


def first_line(flow: Pipeline) -> tuple[int, str]:
    code, out = status(flow)
    return code, out.splitlines()[0] if out else ""


def wait_for_status(flow: Pipeline, code: int, text: str, timeout: float = 30) -> str:
    """Wait until `agent status` exits `code` with `text` in its first line; that line."""
    seen: list[tuple[int, str]] = []

    def reached() -> bool:
        seen.append(first_line(flow))
        return seen[-1][0] == code and text in seen[-1][1]

    try:
        wait_for(reached, timeout, f"status {code} with {text!r}", interval=0.5)
    except AssertionError:
        raise AssertionError(f"last seen: {seen[-1] if seen else None}\n"
                             f"{flow.agent.log()[-2000:]}") from None
    return seen[-1][1]


def set_status_keys(flow: Pipeline, **keys: str) -> None:
    """Change the `status:` section of the running agent's main file (only `agent status`
    reads it, so the agent is not restarted)."""
    settings = yaml.safe_load(flow.config.read_text())
    settings["status"] = keys
    flow.config.write_text(yaml.safe_dump(settings))


def test_ok_then_warning_while_retrying_then_critical_past_critical_after(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    written = append(logs / "app.log", numbered("before", 0, 200))
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    flow.wait_for(written)
    line = wait_for_status(flow, OK, " stored=200c;;;0;")  # the snapshot after the delivery
    assert line.startswith("COUCHLOG OK - 1 files, 0 B behind, spool empty | "), line
    assert " down_seconds=0s;;300;0; " in line and " lines=200c;;;0;" in line

    proxy.set("reset")
    written += append(logs / "app.log", numbered("down", 0, 300))
    line = wait_for_status(flow, WARNING, "COUCHLOG WARNING - ")
    assert line.startswith(f"COUCHLOG WARNING - {database}: unreachable: "), line
    assert "(CouchDB not reachable for " in line and ", retrying); 1 files, " in line
    # Only `agent status` reads the thresholds: a shorter critical_after counts at once.
    set_status_keys(flow, critical_after="1s")
    line = wait_for_status(flow, CRITICAL, "over status.critical_after 1s")
    assert line.startswith(f"COUCHLOG CRITICAL - {database}: unreachable: "), line
    assert ";;1;0; " in line.split(" down_seconds=")[1]

    proxy.set("pass")
    flow.wait_for(written)
    wait_for_status(flow, OK, "COUCHLOG OK - ")
    flow.stop()


def test_a_full_spool_is_critical(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                                  database: str, proxy: FaultProxy) -> None:
    proxy.set("reset")
    written = append(logs / "app.log", numbered("capped", 0, 4000))
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    spool={"max_bytes": "64KiB", "segment_bytes": "16KiB"},
                    shipping={"queue_max_docs": 100}, status={"critical_after": "1h"}).start()
    line = wait_for_status(flow, CRITICAL, f"{database}: spool full, reading paused")
    # The worst first (the WARNING that CouchDB is retried is counted after it).
    assert line.startswith(f"COUCHLOG CRITICAL - {database}: spool full, reading paused"), line
    assert "; 1 files, " in line, line
    behind = int(line.split(" lag_bytes=")[1].split("B;")[0])
    assert behind > 0, line
    proxy.set("pass")
    flow.wait_for(written, timeout=120)
    wait_for_status(flow, OK, "COUCHLOG OK - 1 files, 0 B behind, spool empty")
    flow.stop()


def test_a_stuck_agent_and_a_stopped_one_are_unknown(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    written = append(logs / "app.log", numbered("stuck", 0, 100))
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    flow.wait_for(written)
    wait_for_status(flow, OK, "COUCHLOG OK - ")
    assert flow.agent.process is not None
    pid = flow.agent.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        line = wait_for_status(flow, UNKNOWN, f"yet pid {pid} still runs", timeout=60)
        assert line.startswith("COUCHLOG UNKNOWN - the status file ") and " | " not in line
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_status(flow, OK, "COUCHLOG OK - ")
    flow.agent.kill()
    line = wait_for_status(flow, UNKNOWN, "not running: last status ")
    assert f"ago from pid {pid}" in line
    flow.start()
    flow.wait_for(written)
    flow.stop()


def test_dead_letters_are_critical_within_the_window_across_a_restart(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    refuse_secrets(couch, database)
    lines = [f"{'secret' if n % 10 == 0 else 'public'} line {n}" for n in range(100)]
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    written = append(logs / "app.log", lines)
    flow.wait_for(Counter({k: v for k, v in written.items() if k.startswith("public")}))
    line = wait_for_status(flow, CRITICAL, f"{database}: 10 document(s) refused, the last ")
    assert " dead_lettered=10c;;;0;" in line
    # A restart forgets the count, not the refusals: the dead-letter file says when.
    flow.restart()
    line = wait_for_status(flow, CRITICAL, "a document was refused ")
    assert " dead_lettered=0c;;;0;" in line
    set_status_keys(flow, dead_letter_window="1s")
    wait_for_status(flow, OK, "COUCHLOG OK - ")
    flow.stop()


def test_failed_over_is_a_warning_naming_the_url_in_use(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    """The first URL dead for the whole run: documents flow through the second, and status says
    WARNING (not OK, as a 3-node outage showed before), with each URL's state in the snapshot."""
    proxy.set("reset")
    flow = failover_flow(proxy, tmp_path, couch, couchdb_url, database, logs, "1h").start()
    written = append(logs / "app.log", numbered("failover", 0, 500))
    flow.wait_for(written)
    wait_for_status(flow, WARNING, "COUCHLOG WARNING - ")
    code, text = status(flow)
    assert code == WARNING
    done = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "-c",
                           str(flow.config)], capture_output=True, text=True, timeout=30)
    urls = json.loads(done.stdout)["databases"][database]["urls"]
    assert [(u["in_use"], u["state"]) for u in urls] == [(False, "down"), (True, "up")], urls
    assert urls[0]["down_since"] and urls[0]["last_error"].startswith("unreachable")
    password = urlsplit(couchdb_url).password
    assert not password or password not in done.stdout + text
    flow.stop()
    assert flow.messages() == Counter(written)
