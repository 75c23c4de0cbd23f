"""The shipper: schedules one database's batches to CouchDB's `_bulk_docs`, or to the spool.

It only decides when and where: the HTTP calls are `agent.couchdb`'s, what
an answer means is `agent.bulk`'s (pure), and the health and the URL in use
are one `agent.health.HealthState` value (pure transitions). A document is
acknowledged (its line may be committed) when it is stored (`ok`), already
stored (`conflict`, the answer to a re-sent deterministic `_id`), refused
for good and written to the dead-letter file, or fsynced to the spool.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

import aiohttp
import structlog

from agent.bulk import (
    Answer,
    Outcome,
    RetryBudget,
    Verdict,
    bulk_body,
    classify_results,
    describe,
    verdict,
)
from agent.config import CouchDBConfig, ShippingConfig
from agent.couchdb import CouchDBClient, Endpoint, ssl_context
from agent.deadletter import DeadLetterFile, Rejection
from agent.health import Event, Health, HealthState, backoff
from agent.queue import DocumentQueue
from agent.spool import Spool
from agent.types import Acknowledge, Document

log = structlog.get_logger("agent.shipper")

FLIGHT_CHECK = 0.05
"""Seconds the shipper waits for documents while sends are in flight, before landing them."""


@dataclass(slots=True)
class UrlStatus:
    """What the shipper last saw of one CouchDB URL, for `agent status`."""

    url: str
    in_use: bool = False
    state: Literal["up", "down", "unknown"] = "unknown"
    down_since: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


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
    health: str = Health.OK.value
    retrying: int = 0
    """Documents that got a per-document error and wait to be sent again."""
    down_since: float | None = None
    """Since when no URL takes documents (None while one does)."""
    last_dead_letter_at: float | None = None
    urls: list[UrlStatus] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Sent:
    """What a send settled (stored, conflicts, dead-lettered: `settled`) and what it left
    unsettled: documents CouchDB answered with an error that may pass (`retry`), and documents
    no URL took (`unsent`, in order, the tail of the batch)."""

    settled: list[Document] = field(default_factory=list)
    retry: list[Document] = field(default_factory=list)
    unsent: list[Document] = field(default_factory=list)

    @property
    def unsettled(self) -> list[Document]:
        return self.retry + self.unsent


class Refused(Exception):
    """CouchDB could not take a batch now (unreachable, erroring, refusing the credentials)."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self.target = target
        """Which of the URLs refused it."""


class Shipper:
    """Ships one database's queue; the spool takes what CouchDB cannot take now.

    While CouchDB answers and the spool is empty, up to `shipping.concurrency`
    batches are in flight at once (acknowledgements may come out of order:
    offsets move only over contiguous ones). Otherwise one batch at a time:
    the spool is replayed in turns with new batches, so neither starves.
    A batch one URL refuses is tried on the next before it goes to the spool;
    when every URL refused it, it and every batch after it are spooled and
    CouchDB is probed with the oldest spooled batch, with backoff and jitter.
    Documents answered with a passing error go to the back of the spool and
    are sent again with backoff, at most `bulk.DOC_ATTEMPTS` times.
    """

    def __init__(self, database: str, queue: DocumentQueue, spool: Spool,
                 session: aiohttp.ClientSession, targets: Sequence[Endpoint], couchdb: CouchDBConfig,
                 shipping: ShippingConfig, acknowledge: Acknowledge, dead_letter: DeadLetterFile) -> None:
        self.database = database
        self.queue = queue
        self.spool = spool
        self.client = CouchDBClient(session, couchdb.request_timeout, ssl_context(couchdb))
        self.targets = list(targets)
        self.shipping = shipping
        self.failback_after = couchdb.failback_after
        self.acknowledge = acknowledge
        self.dead_letter = dead_letter
        self.stats = ShipperStats(urls=[UrlStatus(t.url) for t in self.targets])
        self.stats.urls[0].in_use = True
        self.state = HealthState(targets=len(self.targets))
        self.budget = RetryBudget()
        self.in_hand: list[Document] = []
        """A batch taken from the queue and not yet acknowledged (stored or spooled)."""
        self._flights: dict[asyncio.Task[Sent], list[Document]] = {}
        """Sends in flight, with their batches; each ends with what it left unsettled."""
        self._probe: asyncio.Task[None] | None = None
        """The background check of the first URL, while another one is in use."""
        self._next_probe = 0.0
        """While DOWN: when to replay the oldest spooled batch as the probe."""
        self._next_replay = 0.0
        """While documents wait for a retry: not before then."""
        self._next_failback = 0.0
        self._replay_turn = False
        self._path = "/" + quote(database, safe="")
        self.log = log.bind(database=database)

    @property
    def healthy(self) -> bool:
        """Whether batches are sent (else spooled): CouchDB answered the last request."""
        return self.state.sending

    @property
    def health(self) -> Health:
        return self.state.health

    @property
    def idle(self) -> bool:
        return not self.in_hand and not self._flights and len(self.queue) == 0

    async def run(self) -> None:
        cfg = self.shipping
        while True:
            self._start_failback_probe()
            await self._land("one" if len(self._flights) >= cfg.concurrency else "none")
            now = time.monotonic()
            if (self.spool.pending and self.healthy and self._replay_turn
                    and now >= self._next_replay):
                self._replay_turn = False
                await self._land("all")
                await self._replay()
                continue
            self._replay_turn = True
            batch = await self.queue.take(cfg.batch_max_docs, cfg.batch_max_bytes, cfg.linger,
                                          self._wait(now))
            if batch and self.healthy and not self.spool.pending:
                self._flights[asyncio.create_task(self._deliver(batch))] = batch
            elif batch:
                self.in_hand = batch
                await self._land("all")
                await self._to_spool((await self._deliver(batch)).unsettled if self.healthy
                                     else batch)
                self.in_hand = []
            if not self.healthy and time.monotonic() >= self._next_probe:
                await self._land("all")
                await self._replay()

    def _wait(self, now: float) -> float | None:
        """How long to wait for documents before the next thing to do without them."""
        wait: float | None
        if self._flights:
            # Come back soon to land the sends in flight, even if no document arrives.
            wait = FLIGHT_CHECK
        elif not self.healthy:
            wait = max(0.0, self._next_probe - now)
        elif self.spool.pending:
            wait = max(0.0, self._next_replay - now)
        else:
            wait = None
        if self.state.target:
            until = max(0.0, self._next_failback - now)
            wait = until if wait is None else min(wait, until)
        return wait

    async def _land(self, wait: Literal["none", "one", "all"]) -> None:
        """Spool what finished sends left unsettled, after waiting for one or all of them.
        A send stays listed until its leftovers are spooled, so a stop meanwhile spools them."""
        if wait != "none" and self._flights:
            await asyncio.wait(self._flights, return_when=asyncio.FIRST_COMPLETED
                               if wait == "one" else asyncio.ALL_COMPLETED)
        for task in [t for t in self._flights if t.done()]:
            await self._to_spool(task.result().unsettled)
            del self._flights[task]

    async def spool_remaining(self) -> None:
        """At shutdown, after `run` is cancelled: spool the batches in hand and the queue.
        A send still in flight is cancelled and its whole batch spooled: what CouchDB stored of
        it is answered `conflict` when it is sent again."""
        if self._probe is not None:
            self._probe.cancel("agent stopping")
        for task in self._flights:
            task.cancel("agent stopping")
        await asyncio.gather(*self._flights, *([self._probe] if self._probe else []),
                             return_exceptions=True)
        docs = list(self.in_hand)
        for task, batch in self._flights.items():
            docs += batch if task.cancelled() or task.exception() else task.result().unsettled
        self._flights.clear()
        docs += self.queue.take_all()
        self.in_hand = []
        if docs:
            await self._to_spool(docs, wait=False)

    # -- sending

    async def _deliver(self, docs: list[Document]) -> Sent:
        """Send documents fresh from the logs, and acknowledge those settled: their lines may be
        committed. (Spooled documents were acknowledged when they were spooled.)"""
        sent = await self._send(docs)
        self.acknowledge(sent.settled)
        return sent

    async def _send(self, docs: list[Document]) -> Sent:
        """Send `docs`, splitting batches CouchDB refuses as too large or bad, and trying each
        URL once for a batch that fails."""
        work: deque[list[Document]] = deque([docs])
        settled: list[Document] = []
        retry: list[Document] = []
        tried: set[int] = set()
        while work:
            batch = work.popleft()
            try:
                answer = await self._post(batch)
            except Refused as refused:
                tried.add(refused.target)
                self._went_down(refused.target)
                if self.state.target not in tried:
                    work.appendleft(batch)  # the next URL, before the spool
                    continue
                return Sent(settled, retry, batch + [d for rest in work for d in rest])
            if verdict(answer) is Verdict.SPLIT:
                settled += await self._split(batch, work, f"HTTP {answer.status}",
                                             describe(answer.body))
                continue
            outcome = classify_results(batch, answer.json)
            settled += await self._settle(outcome)
            retry += outcome.retry
        self._went_up()
        return Sent(settled, retry)

    async def _post(self, batch: list[Document]) -> Answer:
        """POST one `_bulk_docs`; the answer if it has results or asks for a split, else raise
        Refused. A missing database is created once; missing again right after, it counts as a
        failed request (backoff), not as a reason to send again at once."""
        index = self.state.target
        target = self.targets[index]
        body = bulk_body(batch)
        created = False
        while True:
            self.stats.requests += 1
            response = await self.client.bulk_docs(target, self._path, body)
            if response.error is not None:
                self._failed(target, "unreachable", response.error)
                raise Refused(index)
            answer = Answer.of(response.status, response.body)
            kind = verdict(answer)
            if kind in (Verdict.RESULTS, Verdict.SPLIT):
                self._url_up(index)
                return answer
            error = f"HTTP {response.status} {describe(response.body)}"
            if kind is Verdict.MISSING and not created:
                created = True
                if await self._create_database(target):
                    continue
            elif kind is Verdict.MISSING:
                self._failed(target, "database_missing", error + " (right after it was created)")
            elif kind is Verdict.REFUSED:
                self._failed(target, "refused", error, loud=True,
                             action="check couchdb.username/password and the database's _security "
                             "members; data is kept (spooled) and retried")
            elif response.status in (201, 202, 400, 413):
                self._failed(target, "unexpected_answer", error, loud=True,
                             action="not a CouchDB answer (a proxy in the way?); data is kept "
                             "(spooled) and retried with backoff")
            else:
                self._failed(target, "server_error", error)
            raise Refused(index)

    async def _settle(self, outcome: Outcome) -> list[Document]:
        """Dead-letter what CouchDB refused for good (or too often); return what is settled."""
        given_up = self.budget.charge(outcome)
        rejected = outcome.rejected + given_up
        if rejected:
            await self._dead_letter(rejected)
        done = outcome.stored + outcome.conflicts + [r.doc for r in rejected]
        self.budget.settled(done)
        self.stats.stored += len(outcome.stored)
        self.stats.conflicts += len(outcome.conflicts)
        self.stats.retrying = len(self.budget)
        if done:
            self.stats.last_success = time.time()
        if outcome.retry:
            error, reason = outcome.errors[outcome.retry[0].doc_id]
            self.stats.last_error = (f"{len(self.budget)} document(s) retried after "
                                     f"{error}: {reason}")
            delay = backoff(self.budget.most(outcome.retry), self.shipping.retry_max_backoff,
                            random.random())
            self._next_replay = time.monotonic() + delay
            self.log.warning("documents_not_stored", count=len(outcome.retry), error=error,
                             reason=reason, first_id=outcome.retry[0].doc_id,
                             action=f"spooled and retried in {delay:.1f}s; dead-lettered after "
                             f"{self.budget.attempts} attempts")
        return done

    async def _split(self, batch: list[Document], work: deque[list[Document]],
                     error: str, reason: str) -> list[Document]:
        """A batch refused as a whole is halved until the document at fault stands alone; that
        one is dead-lettered (and returned: it is settled)."""
        if len(batch) == 1:
            await self._dead_letter([Rejection(batch[0], error, reason)])
            return batch
        half = len(batch) // 2
        work.appendleft(batch[half:])
        work.appendleft(batch[:half])
        self.log.info("batch_split", error=error, reason=reason, size=len(batch))
        return []

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
            if self.spool.pending:
                await self._replay()
            # With nothing spooled (an unwritable spool folder), `docs` are the probe.
            if self.healthy or not self.spool.pending:
                docs = (await self._deliver(docs)).unsettled
        # The documents went to CouchDB after a probe, not to the spool: reading may go on.
        self._backpressure(False)

    async def _append(self, docs: list[Document]) -> bool:
        try:
            return await asyncio.to_thread(self.spool.append, docs)
        except OSError as exc:
            if self.stats.last_error != f"spool: {exc}":
                self.log.error("spool_write_failed", folder=str(self.spool.folder), error=str(exc),
                               action="free space there (or lower spool.max_bytes), or make it a "
                               "writable folder; reading pauses meanwhile and nothing is lost")
            self.stats.last_error = f"spool: {exc}"
            return False

    async def _replay(self) -> None:
        """Send the oldest spooled batch; it doubles as the probe while CouchDB is down.
        Documents to retry go to the back of the spool, so they hold up nothing behind them."""
        cfg = self.shipping
        items = await asyncio.to_thread(self.spool.read, cfg.batch_max_docs, cfg.batch_max_bytes)
        if not items:
            # Records counted but none readable (skipped as corrupt): do not spin on them.
            await asyncio.sleep(0.05)
            return
        sent = await self._send([i.doc for i in items])
        unsettled = {id(d) for d in sent.unsent}
        if sent.retry and not await self._append(sent.retry):
            unsettled.update(id(d) for d in sent.retry)
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
        before = self.state
        self.state = before.failed(target)
        self.stats.failures += 1
        self.stats.consecutive_failures = self.state.failures
        self.stats.health = self.state.health.value
        if before.health is not Health.DOWN:
            self.stats.down_since = time.time()
        self._mark_in_use()
        now = time.monotonic()
        if self.state.target != before.target:
            self._next_failback = now + self.failback_after
            self.log.warning("couchdb_failover", url=self.targets[self.state.target].url)
        self._next_probe = now + backoff(self.state.failures, self.shipping.retry_max_backoff,
                                         random.random())

    def _went_up(self) -> None:
        before = self.state
        self.state = before.on(Event.RETRIED if self.budget else Event.SETTLED)
        if before.health is Health.DOWN:
            self.log.info("couchdb_reachable", url=self.targets[self.state.target].url,
                          after_failures=before.failures, spooled=self.spool.pending)
        self.stats.consecutive_failures = 0
        self.stats.health = self.state.health.value
        self.stats.down_since = None

    def _start_failback_probe(self) -> None:
        """While a later URL is in use, check the first one every `failback_after` seconds,
        in the background; fail back only once it answers."""
        if not self.state.target or time.monotonic() < self._next_failback or (
                self._probe is not None and not self._probe.done()):
            return
        self._next_failback = time.monotonic() + self.failback_after
        self._probe = asyncio.create_task(self._failback_probe())

    async def _failback_probe(self) -> None:
        if await self.client.up(self.targets[0]) and self.state.target:
            self.state = self.state.failed_back()
            self._url_up(0)
            self._mark_in_use()
            self.log.info("couchdb_failback", url=self.targets[0].url)

    def _url_up(self, index: int) -> None:
        url = self.stats.urls[index]
        url.state, url.down_since = "up", None

    def _mark_in_use(self) -> None:
        for index, url in enumerate(self.stats.urls):
            url.in_use = index == self.state.target

    async def _dead_letter(self, rejections: list[Rejection]) -> None:
        await asyncio.to_thread(self.dead_letter.append, self.database, rejections)
        self.stats.dead_lettered += len(rejections)
        self.stats.last_dead_letter_at = time.time()
        self.log.error("documents_dead_lettered", count=len(rejections),
                       error=rejections[0].error, reason=rejections[0].reason,
                       first_id=rejections[0].doc.doc_id, file=str(self.dead_letter.path))

    async def _create_database(self, target: Endpoint) -> bool:
        """Create the missing database if the agent's user may; True if it exists now."""
        response = await self.client.create_database(target, self._path)
        if response.error is not None:
            self._failed(target, "unreachable", response.error)
            return False
        if response.status in (201, 202, 412):
            self.log.info("database_created", url=target.url)
            return True
        self._failed(target, "database_missing",
                     f"HTTP {response.status} {describe(response.body)}", loud=True,
                     action="create it with 'agent setup' or as a CouchDB admin; "
                     "data is kept (spooled) and retried")
        return False

    def _failed(self, target: Endpoint, kind: str, error: str, loud: bool = False,
                action: str | None = None) -> None:
        self.stats.last_error = f"{kind}: {error}"
        url = self.stats.urls[self.targets.index(target)]
        now = time.time()
        if url.state != "down":
            url.state, url.down_since = "down", now
        url.last_error, url.last_error_at = f"{kind}: {error}", now
        first = self.stats.consecutive_failures == 0
        if loud or first:
            action = action or "documents are spooled and CouchDB is retried with backoff"
            self.log.error("couchdb_" + kind, url=target.url, error=error, action=action)
        else:
            self.log.debug("couchdb_" + kind, url=target.url, error=error)
