"""The dashboard in headless Chromium (Debian's package, driven over the DevTools protocol):
a reader logs in, the page shows the counts, the live tail shows a new document within 5 s,
and after the backend is stopped and started again the tail reconnects and shows the next one.

The test starts its own pouchdb-server (it must stop and restart it), stores the app with
`agent report --dashboard` and the reports with `--install`, and opens the app straight from
the server at /couchlog_dashboard/_design/dashboard/ (the lead switches it to the nginx front).
A screenshot of the page is saved as dashboard.png in the test's tmp dir, and copied to
$COUCHLOG_ARTIFACTS when that is set.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backend.pouchdb_server import ADMIN, PouchDBServer, free_port
from tests.cdp import Browser, chromium_binary
from tests.couch import CouchDB

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(chromium_binary() is None,
                                 reason="chromium is not installed (apt-get install -y chromium)")]

READER, READER_PASSWORD = "dash_reader", "dash-secret-7"
DOCS = 600


def agent_like_docs(count: int) -> tuple[list[dict[str, Any]], Counter[str], Counter[str]]:
    """Documents shaped as the agent writes them, over the last three days; with the counts per
    day and per IP that the page must show."""
    rng = random.Random(3)
    now = datetime.now(UTC)
    docs, per_day, per_ip = [], Counter[str](), Counter[str]()
    for n in range(count):
        read_at = now - timedelta(hours=rng.randrange(0, 72))
        ip = f"203.0.113.{min(int(rng.paretovariate(1.1)), 60)}"
        docs.append({"_id": f"fail2ban-{n:08d}", "date": read_at.strftime("%Y-%m-%d"),
                     "process": rng.choice(["sshd", "postfix"]), "ip": ip, "machine": "server",
                     "agent": {"source": "fail2ban", "host": "h1", "offset": n,
                               "read_at": read_at.isoformat(timespec="milliseconds")}})
        per_day[read_at.strftime("%Y-%m-%d")] += 1
        per_ip[ip] += 1
    return docs, per_day, per_ip


def agent_report(url: str, password_file: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "report", *args, "--url", url,
                           "--user", ADMIN, "--password-file", str(password_file)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


async def test_dashboard_login_counts_live_tail_and_reconnect(tmp_path: Path) -> None:
    binary = chromium_binary()
    assert binary is not None
    server = PouchDBServer(tmp_path / "server", port=free_port())
    server.start()
    browser = Browser(binary)
    try:
        couch = CouchDB(server.url)
        database = f"log_dash_{uuid.uuid4().hex[:8]}"
        couch.create_db(database)
        docs, per_day, per_ip = agent_like_docs(DOCS)
        status, _ = couch.request("POST", f"/{database}/_bulk_docs", {"docs": docs})
        assert status == 201
        status, _ = couch.request("PUT", f"/_users/org.couchdb.user:{READER}", {
            "_id": f"org.couchdb.user:{READER}", "name": READER, "password": READER_PASSWORD,
            "roles": ["couchlog_reader"], "type": "user"})
        assert status in (201, 202)
        couch.request("PUT", f"/{database}/_security", {
            "admins": {"names": [], "roles": []},
            "members": {"names": [], "roles": ["couchlog_reader"]}})
        admin_password = tmp_path / "admin"
        admin_password.write_text(server.password + "\n")
        agent_report(server.public_url, admin_password, "--install", "--db", database)
        agent_report(server.public_url, admin_password, "--dashboard")

        await browser.start()
        # The app's own files need a reader too: answer as the browser does after its Basic
        # prompt. The app's API requests carry the Authorization its login form builds.
        token = base64.b64encode(f"{READER}:{READER_PASSWORD}".encode()).decode()

        async def paused(params: dict[str, Any]) -> None:
            headers = [{"name": k, "value": v} for k, v in params["request"]["headers"].items()]
            headers.append({"name": "Authorization", "value": f"Basic {token}"})
            await browser.send("Fetch.continueRequest", requestId=params["requestId"],
                               headers=headers)

        async def challenged(params: dict[str, Any]) -> None:
            await browser.send("Fetch.continueWithAuth", requestId=params["requestId"],
                               authChallengeResponse={"response": "ProvideCredentials",
                                                      "username": READER,
                                                      "password": READER_PASSWORD})

        browser.on("Fetch.requestPaused", paused)
        browser.on("Fetch.authRequired", challenged)
        await browser.send("Fetch.enable", handleAuthRequests=True,
                           patterns=[{"urlPattern": "*/couchlog_dashboard/*"}])
        await browser.send("Page.enable")
        await browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=1100,
                           deviceScaleFactor=1, mobile=False)
        await browser.send("Page.navigate", url=f"{server.public_url}/couchlog_dashboard/"
                           "_design/dashboard/index.html")
        await browser.wait_for("document.body !== null && document.body.dataset.ready === '1'",
                               20, "the page's script")

        async def log_in(password: str) -> None:
            await browser.evaluate(
                f"document.getElementById('login-user').value = {READER!r};"
                f"document.getElementById('login-password').value = {password!r};"
                f"document.getElementById('login-db').value = {database!r};"
                "document.getElementById('login-error').textContent = '';"
                "document.getElementById('login-submit').click(); true")

        await log_in("wrong-password")
        error = await browser.wait_for("document.getElementById('login-error').textContent", 10,
                                       "the login to be refused")
        assert "refused" in error
        await log_in(READER_PASSWORD)
        await browser.wait_for("!document.getElementById('main').hidden", 10, "the dashboard")

        # The counts on the page: the chart's total (documents per day) and the top IPs.
        total = await browser.wait_for(
            "/^[0-9]+$/.test(document.getElementById('total').textContent) && "
            "document.getElementById('total').textContent", 60, "the total")
        assert int(total) == sum(per_day.values()) == DOCS
        top = await browser.wait_for(
            "Array.from(document.querySelectorAll('#top tbody tr')).map("
            "r => [r.cells[0].textContent, Number(r.cells[1].textContent)])", 60, "the top table")
        assert [n for _, n in top] == sorted(per_ip.values(), reverse=True)[:10]
        assert all(per_ip[ip] == n for ip, n in top)

        status = "document.getElementById('tail-status').textContent"
        await browser.wait_for(f"{status} === 'live'", 20, "the live tail", show=status)
        first = {"_id": "fail2ban-live-0001", "ip": "198.51.100.7", "process": "sshd",
                 "machine": "server"}
        assert couch.request("PUT", f"/{database}/{first['_id']}", first)[0] == 201
        await browser.wait_for(f"document.querySelector('#tail li[data-id=\"{first['_id']}\"]') "
                               "!== null",
                               5, "the new document in the live tail within 5 s")

        server.stop()
        await browser.wait_for(
            f"{status}.includes('reconnecting')", 30, "the tail to show that it lost the server",
            show=status)
        server = PouchDBServer(tmp_path / "server", port=server.port)
        server.start()
        await browser.wait_for(
            f"{status}.startsWith('live')", 30, "the tail to reconnect", show=status)
        second = {"_id": "fail2ban-live-0002", "ip": "198.51.100.8", "process": "sshd",
                  "machine": "server"}
        assert CouchDB(server.url).request("PUT", f"/{database}/{second['_id']}", second)[0] == 201
        await browser.wait_for(f"document.querySelector('#tail li[data-id=\"{second['_id']}\"]') "
                               "!== null",
                               30, "the next document after the reconnect")
        assert int(await browser.evaluate("document.getElementById('reconnects').textContent")) >= 1
        assert "reconnected" in await browser.evaluate(status)

        shot = await browser.screenshot(tmp_path / "dashboard.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        artifacts = os.environ.get("COUCHLOG_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / "dashboard.png")
    finally:
        await browser.close()
        server.stop()
