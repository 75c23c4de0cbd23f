"""The fleet view: each agent keeps one document about itself in `couchlog_fleet`.

Once a minute, and at start and stop, the agent writes its status summary
(host, version, uptime, health, bytes behind, spool, last stored, per-source
counters) to `couchlog_fleet/host:<host>`, as the agent's own CouchDB user. The
database's `validate_doc_update` (installed by `agent setup`, `VALIDATE` below)
lets a user update only the host documents it wrote itself, so one machine
cannot overwrite another's record; `agent report fleet` reads them all and flags
hosts that went quiet. A failed write is logged, rate-limited by the caller, and
never touches shipping: the fleet view is advice, the logs are the product.
"""

from __future__ import annotations

import ssl as ssl_module
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from agent import __version__

DATABASE = "couchlog_fleet"
INTERVAL = 60.0
"""Seconds between fleet documents; `agent report fleet` flags a host after 3 intervals."""
STALE_INTERVALS = 3

VALIDATE = """function (newDoc, oldDoc, userCtx, secObj) {
  if (userCtx.roles.indexOf('_admin') !== -1) { return; }
  if (userCtx.roles.indexOf('couchlog_agent') === -1) {
    throw({forbidden: 'only couchlog agents write fleet documents'});
  }
  if (newDoc._deleted) { throw({forbidden: 'fleet documents are never deleted'}); }
  if (newDoc._attachments) { throw({forbidden: 'fleet documents carry no attachments'}); }
  if (typeof newDoc.host !== 'string' || newDoc._id !== 'host:' + newDoc.host) {
    throw({forbidden: 'a fleet document is host:<its host field>'});
  }
  if (newDoc.agent_user !== userCtx.name) {
    throw({forbidden: 'agent_user must be the user writing it'});
  }
  // A revision with no parent we can see is a new_edits:false write (a normal create carries
  // no _rev, a normal update has its parent as oldDoc): it could win over the owner's.
  if (!oldDoc && newDoc._rev) { throw({forbidden: 'fleet documents are written normally'}); }
  if (oldDoc && oldDoc.agent_user !== userCtx.name) {
    throw({forbidden: 'this host is reported by another agent user'});
  }
}"""

DESIGN = {"_id": "_design/couchlog_fleet", "validate_doc_update": VALIDATE}


def fleet_document(snapshot: dict[str, Any], host: str, user: str | None, health: str,
                   event: str, now: float | None = None) -> dict[str, Any]:
    """The host's record from a status snapshot (pure)."""
    now = time.time() if now is None else now
    sources = snapshot.get("sources", {})
    databases = snapshot.get("databases", {})
    stored = [db.get("last_success") for db in databases.values() if db.get("last_success")]
    return {
        "_id": f"host:{host}", "host": host, "agent_user": user, "version": __version__,
        "event": event, "updated_at": now, "started_at": snapshot.get("started_at"),
        "uptime": max(0.0, now - float(snapshot.get("started_at") or now)),
        "health": health, "pid": snapshot.get("pid"),
        "bytes_behind": sum(s.get("lag", 0) for s in sources.values()),
        "files": sum(s.get("files", 0) for s in sources.values()),
        "spool_documents": sum(db.get("spool_records", 0) for db in databases.values()),
        "spool_bytes": sum(db.get("spool_bytes", 0) for db in databases.values()),
        "last_stored": max(stored) if stored else None,
        "sources": {name: s.get("counters", {}) for name, s in sources.items()},
        "databases": {name: {k: db.get(k, 0) for k in ("stored", "conflicts", "dead_lettered",
                                                        "spooled", "failures")}
                      for name, db in databases.items()},
    }


class FleetWriter:
    """Writes this host's fleet document to the first URL that takes it."""

    def __init__(self, session: aiohttp.ClientSession, urls: Sequence[tuple[str, dict[str, str]]],
                 timeout: float, database: str = DATABASE,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self.session = session
        self.database = database
        self.urls = list(urls)
        """(base URL, headers with the agent's Authorization) per CouchDB URL."""
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._rev: str | None = None
        self.ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl

    async def write(self, doc: dict[str, Any]) -> str | None:
        """Store `doc`; None when done, else what went wrong (no secret in it)."""
        error: str | None = "no CouchDB URL"
        for url, headers in self.urls:
            path = f"{url}/{quote(self.database, safe='')}/{quote(doc['_id'], safe='')}"
            try:
                error = await self._put(path, headers, doc)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{url}: {type(exc).__name__}"
                continue
            if error is None:
                return None
        return error

    async def _put(self, path: str, headers: dict[str, str], doc: dict[str, Any]) -> str | None:
        for _ in range(2):
            body = {**doc, "_rev": self._rev} if self._rev else doc
            async with self.session.put(path, data=orjson.dumps(body), timeout=self.timeout,
                                        ssl=self.ssl,
                                        headers={**headers, "Content-Type": "application/json"}
                                        ) as response:
                answer = _json(await response.read())
            if response.status in (201, 202):
                self._rev = answer.get("rev")
                return None
            if response.status != 409:
                return f"HTTP {response.status} {answer.get('error', '')}".strip()
            # Our revision is old (another start of this agent wrote since): take the current one.
            async with self.session.get(path, headers=headers, timeout=self.timeout,
                                        ssl=self.ssl) as current:
                self._rev = _json(await current.read()).get("_rev") if current.status == 200 else None
        return "HTTP 409 conflict"


def _json(payload: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def stale_hosts(docs: Sequence[Mapping[str, Any]], now: float, interval: float = INTERVAL) -> set[str]:
    """Hosts not heard from for STALE_INTERVALS intervals."""
    return {d["host"] for d in docs
            if now - float(d.get("updated_at") or 0) > STALE_INTERVALS * interval}
