"""Shipping: batches from one database's queue to CouchDB's `_bulk_docs`, or to the spool.

The decision what each per-document result means is pure
(`classify_results`); `Shipper` is the I/O shell around it. A document is
acknowledged (its line may be committed) when it is stored (`ok`), already
stored (`conflict`, the answer to a re-sent deterministic `_id`), refused
for good and written to the dead-letter file, or fsynced to the spool.
Spooled documents are retried forever, with exponential backoff and jitter,
failing over between URLs and coming back to the first.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import operator
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import orjson
import structlog

from agent.config import CouchDBConfig, ShippingConfig
from agent.deadletter import DeadLetterFile, Rejection
from agent.queue import DocumentQueue
from agent.spool import Spool
from agent.types import Acknowledge, Document

log = structlog.get_logger("agent.shipper")

BODY = operator.attrgetter("body")

FLIGHT_CHECK = 0.05
"""Seconds the shipper waits for documents while sends are in flight, before landing them."""

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
    return b'{"docs":[' + b",".join(map(BODY, docs)) + b"]}"


@dataclass(slots=True)
class ShipperStats:
    stored: int = 0
    conflicts: int = 0
    dead_lettered: int = 0
    spooled: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_success: float | None = None
    backpressure: bool = False
    """The spool is full: reading is paused until CouchDB takes documents again."""


class Refused(Exception):
    """CouchDB could not take a batch now (unreachable, erroring, refusing the credentials)."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self.target = target
        """Which of the URLs refused it."""


class Shipper:
    """Ships one database's queue; the spool takes what CouchDB cannot take now.

    While CouchDB answers and the spool is empty, up to `shipping.concurrency`
    batches are in flight at once, so CouchDB stores one while the agent reads
    and encodes the next (acknowledgements may come out of order: offsets move
    only over contiguous ones). Otherwise one batch at a time: the spool (if it
    holds anything) is replayed in turns with new batches, so neither starves.
    When a request fails, its batch and every batch after it go to the spool
    (fsynced, then acknowledged) and CouchDB is probed with the oldest spooled
    batch, with exponential backoff and jitter, until it answers again.
    """

    def __init__(self, database: str, queue: DocumentQueue, spool: Spool,
                 session: aiohttp.ClientSession, targets: Sequence[Endpoint], couchdb: CouchDBConfig,
                 shipping: ShippingConfig, acknowledge: Acknowledge, dead_letter: DeadLetterFile) -> None:
        self.database = database
        self.queue = queue
        self.spool = spool
        self.session = session
        self.targets = list(targets)
        self.shipping = shipping
        self.timeout = aiohttp.ClientTimeout(total=couchdb.request_timeout)
        self.failback_after = couchdb.failback_after
        self.acknowledge = acknowledge
        self.dead_letter = dead_letter
        self.stats = ShipperStats()
        self.healthy = True
        self.in_hand: list[Document] = []
        """A batch taken from the queue and not yet acknowledged (stored or spooled)."""
        self._flights: dict[asyncio.Task[list[Document]], list[Document]] = {}
        """Sends in flight, with their batches; each ends with the documents it left unsettled."""
        self._target = 0
        self._since_failover = 0.0
        self._next_probe = 0.0
        self._replay_turn = False
        self._path = "/" + quote(database, safe="")
        self.log = log.bind(database=database)

    @property
    def idle(self) -> bool:
        return not self.in_hand and not self._flights and len(self.queue) == 0

    async def run(self) -> None:
        cfg = self.shipping
        while True:
            await self._land("one" if len(self._flights) >= cfg.concurrency else "none")
            if self.spool.pending and self.healthy and self._replay_turn:
                self._replay_turn = False
                await self._land("all")
                await self._replay()
                continue
            self._replay_turn = True
            if self._flights:
                # Come back soon to land the sends in flight, even if no document arrives.
                wait: float | None = FLIGHT_CHECK
            elif self.healthy:
                wait = 0.0 if self.spool.pending else None
            else:
                wait = max(0.0, self._next_probe - time.monotonic())
            batch = await self.queue.take(cfg.batch_max_docs, cfg.batch_max_bytes, cfg.linger, wait)
            if batch and self.healthy and not self.spool.pending:
                self._flights[asyncio.create_task(self._send(batch, replayed=False))] = batch
            elif batch:
                self.in_hand = batch
                await self._land("all")
                await self._to_spool(await self._send(batch, replayed=False) if self.healthy
                                     else batch)
                self.in_hand = []
            if not self.healthy and time.monotonic() >= self._next_probe:
                await self._land("all")
                await self._replay()

    async def _land(self, wait: Literal["none", "one", "all"]) -> None:
        """Spool what finished sends left unsettled, after waiting for one or all of them.
        A send stays listed until its leftovers are spooled, so a stop meanwhile spools them."""
        if wait != "none" and self._flights:
            await asyncio.wait(self._flights, return_when=asyncio.FIRST_COMPLETED
                               if wait == "one" else asyncio.ALL_COMPLETED)
        for task in [t for t in self._flights if t.done()]:
            await self._to_spool(task.result())
            del self._flights[task]

    async def spool_remaining(self) -> None:
        """At shutdown, after `run` is cancelled: spool the batches in hand and the queue.
        A send still in flight is cancelled and its whole batch spooled: what CouchDB stored of
        it is answered `conflict` when it is sent again."""
        for task in self._flights:
            task.cancel("agent stopping")
        await asyncio.gather(*self._flights, return_exceptions=True)
        docs = list(self.in_hand)
        for task, batch in self._flights.items():
            docs += batch if task.cancelled() or task.exception() else task.result()
        self._flights.clear()
        docs += self.queue.take_all()
        self.in_hand = []
        if docs:
            await self._to_spool(docs, wait=False)

    # -- sending

    async def _send(self, docs: list[Document], replayed: bool) -> list[Document]:
        """Send `docs`, splitting batches CouchDB refuses as too large or bad; return the
        documents not settled (on a failure: all that were not sent)."""
        work: deque[list[Document]] = deque([docs])
        unsettled: list[Document] = []
        while work:
            batch = work.popleft()
            try:
                status, payload = await self._post(batch)
            except Refused as refused:
                self._went_down(refused.target)
                return unsettled + batch + [d for rest in work for d in rest]
            if status in (400, 413):
                await self._split(batch, work, f"HTTP {status}", _reason(payload), replayed)
                continue
            outcome = classify_results(batch, _json(payload))
            await self._settle(outcome, replayed)
            unsettled += outcome.retry
        self._went_up()
        return unsettled

    async def _post(self, batch: list[Document]) -> tuple[int, bytes]:
        """POST one `_bulk_docs`; the answer if it is one to act on, else raise Refused."""
        self._fail_back()
        index = self._target
        target = self.targets[index]
        self.stats.requests += 1
        try:
            async with self.session.post(
                target.url + self._path + "/_bulk_docs", data=bulk_body(batch),
                headers={**target.headers, "Content-Type": "application/json"}, timeout=self.timeout,
            ) as response:
                status, payload = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(target, "unreachable", f"{type(exc).__name__}: {exc}")
            raise Refused(index) from exc
        if status in (201, 202, 400, 413):
            return status, payload
        reason = _reason(payload)
        if status in (401, 403):
            self._failed(target, "refused", f"HTTP {status} {reason}", loud=True,
                         action="check couchdb.username/password and the database's _security "
                         "members; data is kept (spooled) and retried")
        elif status == 404:
            if await self._create_database(target):
                return await self._post(batch)
        else:
            self._failed(target, "server_error", f"HTTP {status} {reason}")
        raise Refused(index)

    async def _settle(self, outcome: Outcome, replayed: bool) -> None:
        if outcome.rejected:
            await self._dead_letter(outcome.rejected)
        done = outcome.stored + outcome.conflicts + [r.doc for r in outcome.rejected]
        if not replayed:
            self.acknowledge(done)
        self.stats.stored += len(outcome.stored)
        self.stats.conflicts += len(outcome.conflicts)
        if done:
            self.stats.last_success = time.time()
        if outcome.retry:
            self.log.warning("documents_not_stored", count=len(outcome.retry),
                             first_id=outcome.retry[0].doc_id, action="spooled and retried")

    async def _split(self, batch: list[Document], work: deque[list[Document]],
                     error: str, reason: str, replayed: bool) -> None:
        """A batch refused as a whole is halved until the document at fault stands alone."""
        if len(batch) == 1:
            await self._dead_letter([Rejection(batch[0], error, reason)])
            if not replayed:
                self.acknowledge(batch[:1])
            return
        half = len(batch) // 2
        work.appendleft(batch[half:])
        work.appendleft(batch[:half])
        self.log.info("batch_split", error=error, reason=reason, size=len(batch))

    # -- the spool

    async def _to_spool(self, docs: list[Document], wait: bool = True) -> None:
        """Spool `docs` (fsynced) and acknowledge them. While the spool is full, keep them and
        probe CouchDB: reading stops meanwhile, as the queue fills up (backpressure)."""
        while docs:
            if await self._append(docs):
                self.stats.spooled += len(docs)
                self.acknowledge(docs)
                self._backpressure(False)
                return
            self._backpressure(True)
            if not wait:
                return
            await asyncio.sleep(max(0.05, self._next_probe - time.monotonic()))
            await self._replay()
            if self.healthy:
                docs = await self._send(docs, replayed=False)

    async def _append(self, docs: list[Document]) -> bool:
        try:
            return await asyncio.to_thread(self.spool.append, docs)
        except OSError as exc:
            if self.stats.last_error != f"spool: {exc}":
                self.log.error("spool_write_failed", folder=str(self.spool.folder), error=str(exc),
                               action="free space there (or lower spool.max_bytes); reading "
                               "pauses meanwhile and nothing is lost")
            self.stats.last_error = f"spool: {exc}"
            return False

    async def _replay(self) -> None:
        """Send the oldest spooled batch; it doubles as the probe while CouchDB is down."""
        cfg = self.shipping
        items = await asyncio.to_thread(self.spool.read, cfg.batch_max_docs, cfg.batch_max_bytes)
        if not items:
            # Records counted but none readable (skipped as corrupt): do not spin on them.
            await asyncio.sleep(0.05)
            return
        unsettled = {id(d) for d in await self._send([i.doc for i in items], replayed=True)}
        done = list(itertools.takewhile(lambda i: id(i.doc) not in unsettled, items))
        if done:
            await asyncio.to_thread(self.spool.commit, done)
        if self.healthy and not self.spool.pending:
            self.log.info("spool_replayed", replayed=self.spool.stats.replayed)

    def _backpressure(self, on: bool) -> None:
        if on != self.stats.backpressure:
            self.stats.backpressure = on
            if on:
                self.log.warning("spool_full", bytes=self.spool.stats.bytes,
                                 max_bytes=self.spool.max_bytes,
                                 action="reading paused until CouchDB takes documents again")
            else:
                self.log.info("spool_has_room", action="reading resumed")

    # -- health

    def _went_down(self, target: int) -> None:
        self.healthy = False
        self.stats.failures += 1
        self.stats.consecutive_failures += 1
        # Two sends in flight may fail on one URL: fail over once, not back and forth.
        if len(self.targets) > 1 and target == self._target:
            self._target = (self._target + 1) % len(self.targets)
            self._since_failover = time.monotonic()
            self.log.warning("couchdb_failover", url=self.targets[self._target].url)
        ceiling = min(self.shipping.retry_max_backoff, 0.1 * 2 ** min(self.stats.consecutive_failures, 20))
        self._next_probe = time.monotonic() + random.uniform(ceiling / 2, ceiling)

    def _went_up(self) -> None:
        if not self.healthy:
            self.log.info("couchdb_reachable", url=self.targets[self._target].url,
                          after_failures=self.stats.consecutive_failures,
                          spooled=self.spool.pending)
        self.healthy = True
        self.stats.consecutive_failures = 0

    def _fail_back(self) -> None:
        if self._target and self.healthy and time.monotonic() - self._since_failover > self.failback_after:
            self._target = 0
            self.log.info("couchdb_failback", url=self.targets[0].url)

    async def _dead_letter(self, rejections: list[Rejection]) -> None:
        await asyncio.to_thread(self.dead_letter.append, self.database, rejections)
        self.stats.dead_lettered += len(rejections)
        self.log.error("documents_dead_lettered", count=len(rejections),
                       error=rejections[0].error, reason=rejections[0].reason,
                       first_id=rejections[0].doc.doc_id, file=str(self.dead_letter.path))

    async def _create_database(self, target: Endpoint) -> bool:
        """Create the missing database if the agent's user may; True if it exists now."""
        try:
            async with self.session.put(target.url + self._path, headers=target.headers,
                                        timeout=self.timeout) as response:
                status, reason = response.status, _reason(await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(target, "unreachable", f"{type(exc).__name__}: {exc}")
            return False
        if status in (201, 202, 412):
            self.log.info("database_created", url=target.url)
            return True
        self._failed(target, "database_missing", f"HTTP {status} {reason}", loud=True,
                     action="create it with 'agent setup' or as a CouchDB admin; "
                     "data is kept (spooled) and retried")
        return False

    def _failed(self, target: Endpoint, kind: str, error: str, loud: bool = False,
                action: str | None = None) -> None:
        self.stats.last_error = f"{kind}: {error}"
        first = self.stats.consecutive_failures == 0
        if loud or first:
            action = action or "documents are spooled and CouchDB is retried with backoff"
            self.log.error("couchdb_" + kind, url=target.url, error=error, action=action)
        else:
            self.log.debug("couchdb_" + kind, url=target.url, error=error)


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
