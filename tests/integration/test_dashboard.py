"""The dashboard in headless Chromium (Debian's package, driven over the DevTools protocol),
through the nginx front: the backend is provisioned with `agent setup` (users, _security,
validation, the shipped reports and the dashboard) and Debian's nginx runs the front rendered by
`agent setup --nginx`, with TLS from a throwaway CA whose certificates Chromium is told to trust.

The browser opens https://127.0.0.1:<port>/dashboard/, gets nginx's 401 Basic challenge and
answers it with the reader's credentials the way a person answers the browser's prompt
(Fetch.authRequired); the app then logs in with its own form, which sends Basic on each request.
Nothing is added to the browser's requests. Documents come in through the front anonymously
(the public writer) and must show in the live tail within 5 s; after the backend is stopped and
started again (nginx stays) the tail reconnects and shows the next one. Hostile documents must
render as text, fire no script, and not stop the tail. The fleet panel lists the hosts of
couchlog_fleet (one fresh document, one an hour old) and flags the old one.

With COUCHDB_URL set the test cannot restart that server: only the reconnect step is skipped.
A screenshot of the page is saved as dashboard.png in the test's tmp dir, and copied to
$COUCHLOG_ARTIFACTS when that is set.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from backend.pouchdb_server import PouchDBServer, free_port
from tests.cdp import Browser, chromium_binary
from tests.couch import CouchDB
from tests.front import Front, running_front, spki_sha256
from tests.nginx import NGINX

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(chromium_binary() is None,
                                 reason="chromium is not installed (apt-get install -y chromium)"),
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup "
                                 "installs Debian's nginx)")]

DOCS = 600
STATUS = "document.getElementById('tail-status').textContent"


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


@dataclass
class Backend:
    """The test backend: its admin URL, and the pouchdb-server this test runs (None for
    COUCHDB_URL, which the test cannot stop)."""

    url: str
    server: PouchDBServer | None

    def restart(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = PouchDBServer(self.server.data_dir, port=self.server.port)
        self.server.start()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    url = os.environ.get("COUCHDB_URL")
    if url:
        yield Backend(url.rstrip("/"), None)
        return
    # A server of its own: the reconnect step stops and restarts it.
    server = PouchDBServer(tmp_path / "server", port=free_port())
    server.start()
    backend = Backend(server.url, server)
    try:
        yield backend
    finally:
        if backend.server is not None:
            backend.server.stop()


@dataclass
class Page:
    """Chromium on the front's /dashboard/, with what it saw: the auth challenges it answered
    and the JavaScript dialogs that opened (none may: an alert is injected script running)."""

    browser: Browser
    front: Front
    challenges: list[dict[str, Any]] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def log_in(self, password: str) -> None:
        await self.browser.evaluate(
            f"document.getElementById('login-user').value = {json.dumps(self.front.reader.name)};"
            f"document.getElementById('login-password').value = {json.dumps(password)};"
            f"document.getElementById('login-db').value = {json.dumps(self.front.db)};"
            "document.getElementById('login-error').textContent = '';"
            "document.getElementById('login-submit').click(); true")

    def post_anonymously(self, doc: dict[str, Any] | str) -> None:
        """As anyone on the network may: a POST through the front without credentials."""
        body = doc if isinstance(doc, str) else json.dumps(doc)
        answer = self.front.client.request("POST", f"/{self.front.db}", body)
        assert answer.status in (201, 202), answer

    async def wait_in_tail(self, doc_id: str, timeout: float, what: str) -> str:
        return str(await self.browser.wait_for(
            f"(document.querySelector('#tail li[data-id=' + {json.dumps(json.dumps(doc_id))} + ']')"
            " || {}).textContent", timeout, what, show=STATUS + " + '\\n' + "
            "document.getElementById('tail').innerText.slice(0, 1500)"))


@asynccontextmanager
async def dashboard(front: Front) -> AsyncIterator[Page]:
    """Chromium on https://127.0.0.1:<port>/dashboard/, logged in neither to nginx nor to the app."""
    binary = chromium_binary()
    assert binary is not None
    # Trust the throwaway CA's certificates, and only them (not every certificate error).
    spki = ",".join(spki_sha256(cert) for cert in (front.cert, front.ca))
    browser = Browser(binary, (f"--ignore-certificate-errors-spki-list={spki}",))
    page = Page(browser, front)
    try:
        await browser.start()

        async def paused(params: dict[str, Any]) -> None:
            # Requests pass unchanged: pausing them is what lets the browser report challenges.
            await browser.send("Fetch.continueRequest", requestId=params["requestId"])

        async def challenged(params: dict[str, Any]) -> None:
            # What a person does at the browser's Basic prompt: the reader's name and password
            # for the dashboard's own files; for the app's API requests the app handles the 401
            # itself (its login form), so the prompt is cancelled.
            page.challenges.append(params)
            path = urlsplit(params["request"]["url"]).path
            response = ({"response": "ProvideCredentials", "username": front.reader.name,
                         "password": front.reader.password}
                        if path.startswith("/dashboard/") else {"response": "CancelAuth"})
            await browser.send("Fetch.continueWithAuth", requestId=params["requestId"],
                               authChallengeResponse=response)

        async def dialog(params: dict[str, Any]) -> None:
            page.dialogs.append(str(params.get("message")))
            await browser.send("Page.handleJavaScriptDialog", accept=False)

        browser.on("Fetch.requestPaused", paused)
        browser.on("Fetch.authRequired", challenged)
        browser.on("Page.javascriptDialogOpening", dialog)
        await browser.send("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        await browser.send("Page.enable")
        await browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=1100,
                           deviceScaleFactor=1, mobile=False)
        await browser.send("Page.navigate", url=f"{front.url}/dashboard/")
        await browser.wait_for("document.body !== null && document.body.dataset.ready === '1'",
                               20, "the page's script")
        assert await browser.evaluate("location.href") == f"{front.url}/dashboard/"
        # The page came through nginx's Basic challenge, answered as the browser's prompt is.
        first = page.challenges[0]
        assert urlsplit(first["request"]["url"]).path == "/dashboard/"
        assert first["authChallenge"]["scheme"].lower() == "basic"
        assert first["authChallenge"]["realm"] == "couchlog"
        assert first["authChallenge"]["origin"] == front.url
        yield page
    finally:
        await browser.close()


async def test_dashboard_through_the_front_login_counts_live_tail_and_reconnect(
        backend: Backend, tmp_path: Path) -> None:
    couch = CouchDB(backend.url)
    with running_front(backend.url, couch, tmp_path / "front",
                       f"log_dash_{secrets.token_hex(4)}") as front:
        docs, per_day, per_ip = agent_like_docs(DOCS)
        status, _ = couch.request("POST", f"/{front.db}/_bulk_docs", {"docs": docs})
        assert status == 201
        async with dashboard(front) as page:
            browser = page.browser
            await page.log_in("wrong-password")
            error = await browser.wait_for("document.getElementById('login-error').textContent",
                                           10, "the login to be refused")
            assert "refused" in error
            await page.log_in(front.reader.password)
            await browser.wait_for("!document.getElementById('main').hidden", 10, "the dashboard")

            # The counts on the page: the chart's total (documents per day) and the top IPs.
            total = await browser.wait_for(
                "/^[0-9]+$/.test(document.getElementById('total').textContent) && "
                "document.getElementById('total').textContent", 60, "the total")
            assert int(total) == sum(per_day.values()) == DOCS
            top = await browser.wait_for(
                "Array.from(document.querySelectorAll('#top tbody tr')).map("
                "r => [r.cells[0].textContent, Number(r.cells[1].textContent)])", 60,
                "the top table")
            assert [n for _, n in top] == sorted(per_ip.values(), reverse=True)[:10]
            assert all(per_ip[ip] == n for ip, n in top)

            await browser.wait_for(f"{STATUS} === 'live'", 20, "the live tail", show=STATUS)
            page.post_anonymously({"_id": "app.live-0001", "ip": "198.51.100.7",
                                   "process": "sshd", "machine": "server"})
            shown = await page.wait_in_tail("app.live-0001", 5,
                                            "the new document in the live tail within 5 s")
            assert "ip=198.51.100.7" in shown

            restartable = backend.server is not None
            if restartable:
                assert backend.server is not None
                backend.server.stop()
                await browser.wait_for(f"{STATUS}.includes('reconnecting')", 30,
                                       "the tail to show that it lost the server", show=STATUS)
                backend.restart()
                await browser.wait_for(f"{STATUS}.startsWith('live')", 30,
                                       "the tail to reconnect", show=STATUS)
                page.post_anonymously({"_id": "app.live-0002", "ip": "198.51.100.8",
                                       "process": "sshd", "machine": "server"})
                await page.wait_in_tail("app.live-0002", 30,
                                        "the next document after the reconnect")
                reconnects = await browser.evaluate(
                    "document.getElementById('reconnects').textContent")
                assert int(reconnects) >= 1
                assert "reconnected" in await browser.evaluate(STATUS)
            assert page.dialogs == []

            shot = await browser.screenshot(tmp_path / "dashboard.png")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            artifacts = os.environ.get("COUCHLOG_ARTIFACTS")
            if artifacts:
                Path(artifacts).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(artifacts) / "dashboard.png")
    if not restartable:
        pytest.skip("COUCHDB_URL is set: the test cannot stop and restart that server, so the "
                    "reconnect step was skipped (login, counts and live tail through the front "
                    "passed)")


IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>alert(2)</script>"
SVG = "<svg onload=alert(3)>"
DEPTH = 1000


def hostile_docs() -> list[str]:
    """Documents anyone may POST through the front, aimed at the page, as JSON text: markup and
    script in the fields it shows, a string as large as the front lets in, deep nesting (written
    out by hand: json.dumps recurses), and values that are not strings (an object whose toString
    is no function makes String(value) throw)."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    deep = '{"a":' * DEPTH + json.dumps(IMG) + "}" * DEPTH
    return [
        json.dumps({"_id": "app.xss", "ip": IMG, "process": SCRIPT, "machine": SVG,
                    "message": "<b>bold</b>", "host": SCRIPT,
                    "agent": {"source": IMG, "read_at": now}}),
        json.dumps({"_id": "app.huge", "ip": "198.51.100.9", "message": SCRIPT + "x" * 600_000,
                    "process": "p" * 5_000}),
        f'{{"_id": "app.deep", "nested": {deep}}}',
        f'{{"_id": "app.deep-summary", "message": {deep}, "ip": ["a", {{"b": {json.dumps(IMG)}}}]}}',
        json.dumps({"_id": "app.tostring", "ip": {"toString": 1}, "process": {"valueOf": IMG}}),
    ]


async def test_dashboard_renders_hostile_documents_as_text(backend: Backend, tmp_path: Path) -> None:
    couch = CouchDB(backend.url)
    with running_front(backend.url, couch, tmp_path / "front",
                       f"log_dash_{secrets.token_hex(4)}") as front:
        async with dashboard(front) as page:
            browser = page.browser
            await page.log_in(front.reader.password)
            await browser.wait_for(f"{STATUS} === 'live'", 20, "the live tail", show=STATUS)
            for doc in hostile_docs():
                page.post_anonymously(doc)
            page.post_anonymously({"_id": "app.after", "ip": "198.51.100.10"})
            # The tail goes on past them: one document must never stop it.
            await page.wait_in_tail("app.after", 5, "the document after the hostile ones")

            xss = await page.wait_in_tail("app.xss", 1, "the markup document")
            for text in (f"ip={IMG}", f"process={SCRIPT}", f"machine={SVG}", "message=<b>bold</b>"):
                assert text in xss
            huge = await page.wait_in_tail("app.huge", 1, "the huge document")
            assert f"message={SCRIPT}xxx" in huge and len(huge) < 10_000
            deep = await page.wait_in_tail("app.deep", 1, "the deeply nested document")
            assert deep.startswith("app.deep  ") and '{"a":{"a":' in deep
            summary = await page.wait_in_tail("app.deep-summary", 1, "the nested fields")
            assert '{"a":{"a":' in summary and f'ip=["a",{{"b":"{IMG}"}}]' in summary
            odd = await page.wait_in_tail("app.tostring", 1, "the toString document")
            assert 'ip={"toString":1}' in odd and f'process={{"valueOf":"{IMG}"}}' in odd

            # The top table, for the fields the hostile documents fill.
            for name, value in (("ip", IMG), ("process", SCRIPT), ("machine", SVG),
                                ("source", IMG), ("host", SCRIPT)):
                await browser.evaluate(
                    f"document.getElementById('field').value = {json.dumps(name)};"
                    "document.getElementById('field').dispatchEvent(new Event('change')); true")
                await browser.wait_for(
                    "Array.from(document.querySelectorAll('#top tbody tr td:first-child'))"
                    f".some(c => c.textContent === {json.dumps(value)})", 20,
                    f"{value} as text in the top table for {name}")

            # Markup stayed text: no element came from the documents, and no script ran.
            injected = await browser.evaluate(
                "document.querySelectorAll('#tail *:not(li), #top tbody *:not(tr):not(td)')"
                ".length")
            assert injected == 0
            assert page.dialogs == []
            assert await browser.evaluate("document.getElementById('chart-error').textContent") == ""


FLEET_ROWS = ("Array.from(document.querySelectorAll('#fleet tbody tr')).map("
              "r => [r.dataset.host, r.className, Array.from(r.cells).map(c => c.textContent)])")


async def test_dashboard_fleet_panel_lists_hosts_and_flags_the_quiet_one(
        backend: Backend, tmp_path: Path) -> None:
    """Two fleet documents put in couchlog_fleet by an admin: one written now, one an hour ago
    (past 3 intervals of 60 s). The panel, read as the reader through the front, lists both with
    their numbers as text, and flags only the old one."""
    couch = CouchDB(backend.url)
    tag = secrets.token_hex(4)
    now = datetime.now(UTC).timestamp()
    fresh = {"_id": f"host:web-{tag}", "host": f"web-{tag}", "health": "OK", "updated_at": now,
             "event": "tick", "bytes_behind": 1234, "spool_documents": 0, "spool_bytes": 0}
    old = {"_id": f"host:db-{tag}{IMG}", "host": f"db-{tag}{IMG}", "health": "WARNING",
           "updated_at": now - 3600, "event": "tick", "bytes_behind": 98765,
           "spool_documents": 17, "spool_bytes": 4096}
    with running_front(backend.url, couch, tmp_path / "front",
                       f"log_dash_{secrets.token_hex(4)}") as front:
        # `agent setup` (in running_front) created couchlog_fleet with the reader as a member.
        status, answer = couch.request("POST", "/couchlog_fleet/_bulk_docs", {"docs": [fresh, old]})
        assert status == 201 and all("rev" in a for a in answer), answer
        try:
            async with dashboard(front) as page:
                browser = page.browser
                await page.log_in(front.reader.password)
                rows = await browser.wait_for(
                    f"(rows => rows.length === 2 && rows)({FLEET_ROWS}"
                    f".filter(r => r[0].includes({json.dumps(tag)})))",
                    20, "both hosts in the fleet panel",
                    show="(document.getElementById('fleet') || {}).innerText + ' ' + "
                         "(document.getElementById('fleet-error') || {}).textContent")
                by_host = {host: (kind, cells) for host, kind, cells in rows}
                kind, cells = by_host[old["host"]]
                assert kind == "stale"
                assert cells[0] == old["host"] and cells[1] == "1h ago"
                assert cells[2:6] == ["WARNING", "98765", "17", "4096"]
                assert cells[6] == "NOT SEEN for over 3 intervals"
                kind, cells = by_host[fresh["host"]]
                assert kind == ""
                assert cells[0] == fresh["host"] and re.fullmatch(r"[0-9]+[sm] ago", cells[1])
                assert cells[2:7] == ["OK", "1234", "0", "0", ""]
                # Quiet hosts come first; the host's markup stayed text.
                hosts = [r[0] for r in await browser.evaluate(FLEET_ROWS)]
                assert hosts.index(old["host"]) < hosts.index(fresh["host"])
                assert await browser.evaluate(
                    "document.querySelectorAll('#fleet tbody *:not(tr):not(td)').length") == 0
                assert await browser.evaluate(
                    "document.getElementById('fleet-error').textContent") == ""
                assert page.dialogs == []
        finally:
            for doc in (fresh, old):
                got, current = couch.request("GET", f"/couchlog_fleet/{quote(doc['_id'], safe='')}")
                if got == 200:
                    couch.request("DELETE", f"/couchlog_fleet/{quote(doc['_id'], safe='')}"
                                  f"?rev={current['_rev']}")
