"""Shipping: batches from one database's queue to CouchDB's `_bulk_docs`, retried until safe.

The decision what each per-document result means is pure
(`classify_results`); `Shipper` is the I/O shell around it. A batch is done
only when every one of its documents is acknowledged: stored (`ok`), already
stored (`conflict`, the answer to a re-sent deterministic `_id`), or refused
for good and written to the dead-letter file. Everything else is retried,
forever, with exponential backoff and jitter, failing over between URLs.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import orjson
import structlog

from agent.config import CouchDBConfig, ShippingConfig
from agent.deadletter import DeadLetterFile, Rejection
from agent.queue import DocumentQueue
from agent.types import Ack, Acknowledge, Document

log = structlog.get_logger("agent.shipper")

FINAL_DOC_ERRORS = frozenset({"forbidden", "unauthorized"})
"""Per-document errors that retrying cannot fix (a validate_doc_update refusal)."""


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


@dataclass(slots=True)
class Outcome:
    """What a `_bulk_docs` answer means for each document of the batch."""

    stored: list[Document] = field(default_factory=list)
    conflicts: list[Document] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    retry: list[Document] = field(default_factory=list)


def classify_results(docs: Sequence[Document], results: Any) -> Outcome:
    """Match each document with its result by `_id`; a document without a result is retried."""
    outcome = Outcome()
    by_id: dict[str, Any] = {}
    if isinstance(results, list):
        for item in results:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                by_id.setdefault(item["id"], item)
    for doc in docs:
        result = by_id.get(doc.doc_id)
        if result is None:
            outcome.retry.append(doc)
        elif result.get("ok") is True or ("rev" in result and "error" not in result):
            outcome.stored.append(doc)
        elif result.get("error") == "conflict":
            outcome.conflicts.append(doc)
        elif result.get("error") in FINAL_DOC_ERRORS:
            outcome.rejected.append(Rejection(doc, str(result["error"]),
                                              str(result.get("reason", ""))))
        else:
            outcome.retry.append(doc)
    return outcome


def bulk_body(docs: Sequence[Document]) -> bytes:
    return b'{"docs":[' + b",".join(d.body for d in docs) + b"]}"


@dataclass(slots=True)
class ShipperStats:
    stored: int = 0
    conflicts: int = 0
    dead_lettered: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_success: float | None = None


class Shipper:
    """Ships one database's queue; one request in flight at a time keeps acks in file order."""

    def __init__(self, database: str, queue: DocumentQueue, session: aiohttp.ClientSession,
                 targets: Sequence[Endpoint], couchdb: CouchDBConfig, shipping: ShippingConfig,
                 acknowledge: Acknowledge, dead_letter: DeadLetterFile) -> None:
        self.database = database
        self.queue = queue
        self.session = session
        self.targets = list(targets)
        self.shipping = shipping
        self.timeout = aiohttp.ClientTimeout(total=couchdb.request_timeout)
        self.acknowledge = acknowledge
        self.dead_letter = dead_letter
        self.stats = ShipperStats()
        self.busy = False
        self._target = 0
        self._path = "/" + quote(database, safe="")
        self.log = log.bind(database=database)

    async def run(self) -> None:
        cfg = self.shipping
        while True:
            batch = await self.queue.take(cfg.batch_max_docs, cfg.batch_max_bytes, cfg.linger)
            self.busy = True
            try:
                await self.deliver(batch)
            finally:
                self.busy = False

    @property
    def idle(self) -> bool:
        return not self.busy and len(self.queue) == 0

    async def deliver(self, docs: Sequence[Document]) -> None:
        """Return once every document of `docs` is acknowledged."""
        work: deque[list[Document]] = deque([list(docs)])
        failures = 0
        while work:
            batch = work[0]
            delay = await self._attempt(batch, work)
            if delay is None:
                failures = 0
                continue
            failures += 1
            self.stats.failures += 1
            self.stats.consecutive_failures += 1
            await asyncio.sleep(self._backoff(failures, delay))
        self.stats.consecutive_failures = 0

    async def _attempt(self, batch: list[Document], work: deque[list[Document]]) -> float | None:
        """Send `batch` (the head of `work`) once. Return None on progress, else the minimum
        backoff before the next try."""
        target = self.targets[self._target]
        self.stats.requests += 1
        try:
            async with self.session.post(
                target.url + self._path + "/_bulk_docs", data=bulk_body(batch),
                headers={**target.headers, "Content-Type": "application/json"}, timeout=self.timeout,
            ) as response:
                status = response.status
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(target, "unreachable", f"{type(exc).__name__}: {exc}")
            self._fail_over()
            return 0.1
        if status in (201, 202):
            progressed = await self._settle(batch, work, _json(payload))
            return None if progressed else 0.1
        reason = _reason(payload)
        if status in (400, 413):
            await self._split(batch, work, f"HTTP {status}", reason)
            return None
        if status in (401, 403):
            self._failed(target, "refused", f"HTTP {status} {reason}", loud=True,
                         action="check couchdb.username/password and the database's _security "
                         "members; data is kept and retried")
            return self.shipping.retry_max_backoff
        if status == 404:
            await self._create_database(target)
            return 1.0
        self._failed(target, "server_error", f"HTTP {status} {reason}")
        if status >= 500:
            self._fail_over()
        return 0.1

    async def _settle(self, batch: list[Document], work: deque[list[Document]],
                      results: Any) -> bool:
        """Acknowledge what the answer settles; return whether anything was."""
        outcome = classify_results(batch, results)
        if outcome.rejected:
            await self._dead_letter(outcome.rejected)
        done = outcome.stored + outcome.conflicts + [r.doc for r in outcome.rejected]
        self.acknowledge([Ack(d.file, d.end) for d in done])
        self.stats.stored += len(outcome.stored)
        self.stats.conflicts += len(outcome.conflicts)
        self.stats.last_success = time.time()
        self.stats.consecutive_failures = 0
        if outcome.retry:
            work[0] = outcome.retry
            self.log.warning("documents_retried", count=len(outcome.retry),
                             first_id=outcome.retry[0].doc_id)
        else:
            work.popleft()
        return bool(done)

    async def _split(self, batch: list[Document], work: deque[list[Document]],
                     error: str, reason: str) -> None:
        """A batch refused as a whole is halved until the document at fault stands alone."""
        work.popleft()
        if len(batch) == 1:
            await self._dead_letter([Rejection(batch[0], error, reason)])
            self.acknowledge([Ack(batch[0].file, batch[0].end)])
            return
        half = len(batch) // 2
        work.appendleft(batch[half:])
        work.appendleft(batch[:half])
        self.log.info("batch_split", error=error, reason=reason, size=len(batch))

    async def _dead_letter(self, rejections: list[Rejection]) -> None:
        await asyncio.to_thread(self.dead_letter.append, self.database, rejections)
        self.stats.dead_lettered += len(rejections)
        self.log.error("documents_dead_lettered", count=len(rejections),
                       error=rejections[0].error, reason=rejections[0].reason,
                       first_id=rejections[0].doc.doc_id, file=str(self.dead_letter.path))

    async def _create_database(self, target: Endpoint) -> None:
        try:
            async with self.session.put(target.url + self._path, headers=target.headers,
                                        timeout=self.timeout) as response:
                status, reason = response.status, _reason(await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(target, "unreachable", f"{type(exc).__name__}: {exc}")
            return
        if status in (201, 202, 412):
            self.log.info("database_created", url=target.url)
        else:
            self._failed(target, "database_missing", f"HTTP {status} {reason}", loud=True,
                         action="create it with 'agent setup' or as a CouchDB admin; "
                         "data is kept and retried")

    def _failed(self, target: Endpoint, kind: str, error: str, loud: bool = False,
                action: str | None = None) -> None:
        self.stats.last_error = f"{kind}: {error}"
        first = self.stats.consecutive_failures == 0
        if loud or first:
            self.log.error("couchdb_" + kind, url=target.url, error=error, action=action)
        else:
            self.log.debug("couchdb_" + kind, url=target.url, error=error)

    def _fail_over(self) -> None:
        if len(self.targets) > 1:
            self._target = (self._target + 1) % len(self.targets)

    def _backoff(self, failures: int, minimum: float) -> float:
        ceiling = min(self.shipping.retry_max_backoff, 0.1 * 2 ** min(failures, 20))
        return max(minimum, random.uniform(ceiling / 2, ceiling))


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _reason(payload: bytes) -> str:
    body = _json(payload)
    if isinstance(body, dict):
        return f"{body.get('error', '')}: {body.get('reason', '')}".strip(": ")
    return payload[:200].decode("utf-8", "replace")
