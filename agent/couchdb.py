"""The CouchDB client: one HTTP request per call, answered with a typed `Response`.

It decides nothing: what an answer means is `agent.bulk`'s job, and what to
do about it the shipper's. Credentials travel in headers built once from the
config (`endpoints`), so a URL that reaches a log line never carries them.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from agent.config import CouchDBConfig


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One CouchDB URL, with the credentials split off so they never reach a log line."""

    url: str
    headers: dict[str, str]


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def endpoints(config: CouchDBConfig) -> list[Endpoint]:
    result = []
    for raw in config.urls:
        parts = urlsplit(raw)
        headers = {}
        if parts.username is not None:
            headers = basic_auth(unquote(parts.username), unquote(parts.password or ""))
        elif config.username is not None:
            headers = basic_auth(config.username, config.password or "")
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        result.append(Endpoint(urlunsplit((parts.scheme, netloc, parts.path, "", "")), headers))
    return result


def ssl_context(config: CouchDBConfig) -> ssl.SSLContext | None:
    """The TLS context `couchdb.ca_file` and `couchdb.tls_verify` ask for; None for the system
    default. (Read with getattr: a config without these keys means the default.)"""
    ca_file: str | None = getattr(config, "ca_file", None)
    verify: bool = getattr(config, "tls_verify", True)
    if ca_file is None and verify:
        return None
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def connection_limit(concurrency: int, databases: int) -> int:
    """Connections the shared pool needs: each database's shipper has up to `concurrency`
    requests in flight, plus one failback probe (a database's creation follows its own POST
    on the connection that POST released)."""
    return databases * (concurrency + 1)


@dataclass(frozen=True, slots=True)
class Response:
    """What one request got: an HTTP status and body, or (`status` 0) why no answer came."""

    status: int
    body: bytes = b""
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None


class CouchDBClient:
    """HTTP calls to CouchDB over one shared session; never raises for a network failure."""

    def __init__(self, session: aiohttp.ClientSession, request_timeout: float,
                 context: ssl.SSLContext | None = None) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.ssl: ssl.SSLContext | bool = True if context is None else context
        self._no_up: set[str] = set()
        """URLs whose server has no `/_up` (pouchdb-server): probed with `GET /` instead."""
        self.observe: Callable[[float], None] | None = None
        """Told the seconds each `_bulk_docs` request took, answered or not (the metrics'
        latency histogram); set by the agent."""

    async def bulk_docs(self, target: Endpoint, db_path: str, body: bytes) -> Response:
        started = time.monotonic()
        response = await self._request("POST", target, db_path + "/_bulk_docs", body,
                                       {"Content-Type": "application/json"})
        if self.observe is not None:
            self.observe(time.monotonic() - started)
        return response

    async def create_database(self, target: Endpoint, db_path: str) -> Response:
        return await self._request("PUT", target, db_path)

    async def up(self, target: Endpoint) -> bool:
        """Whether the server at `target` answers (`GET /_up`, or `GET /` where there is none).
        A 404 with a CouchDB `status` in its body is CouchDB in maintenance mode: not up."""
        if target.url not in self._no_up:
            response = await self._request("GET", target, "/_up")
            if response.status != 404 or b'"status"' in response.body:
                return response.status == 200
            self._no_up.add(target.url)
        return (await self._request("GET", target, "/")).status == 200

    async def _request(self, method: str, target: Endpoint, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> Response:
        try:
            async with self.session.request(
                method, target.url + path, data=body, headers={**target.headers, **(headers or {})},
                timeout=self.timeout, ssl=self.ssl,
            ) as response:
                return Response(response.status, await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Response(0, error=f"{type(exc).__name__}: {exc}")
