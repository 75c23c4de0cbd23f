"""The `Agent`: owns every long-lived task, starts the stages, ticks, and stops them in reverse.

Life of the process, as in uvicorn's `Server`: `startup()` (offsets,
shippers, queues, then tailers and the watcher: downstream first),
`main_loop()` (one housekeeping tick: offsets, progress logs), and
`shutdown()` (reading stops first, the watcher before the tailers it feeds,
then the queues drain within `shutdown_timeout`, what is left is cancelled,
work still running in threads is waited for, and only then are the spools
closed and the offsets written one last time). Signal handlers only set
`should_exit`; a second signal sets `force_exit`, which skips the drain but
still writes the offsets already acknowledged.

SIGHUP (or `agent reload`) re-reads the configuration in its own task, so
the tick goes on meanwhile (`reload`, `agent.reload` says what applies):
tailers of removed and changed sources stop once what they read is handed
on, changed ones start again where those stopped, a new database gets its
queue, spool and shipper, and one no source ships to any more is kept until
its queue and spool are empty (after a restart too: a spool folder no source
names that still holds documents is delivered, then retired). A
configuration with problems is refused and the running one goes on; the
status snapshot says so.

Each tailer, each shipper and the watcher is supervised on its own: one that
raises is logged, shown in the status snapshot and retried after a backoff
(`agent.supervisor`), and everything else keeps going. A tailer's retry is a
new tailer for the same file, opened by the next scan, which resumes from the
offsets kept for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import resource
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import unquote

import aiohttp
import structlog

from agent import fleet
from agent import reload as reload_module
from agent.config import AgentConfig, ConfigError, SourceConfig, StartAt
from agent.couchdb import connection_limit, endpoints, ssl_context
from agent.counters import SourceCounters
from agent.deadletter import DeadLetterFile
from agent.fleet import FleetWriter, fleet_document
from agent.health import Health
from agent.notify import SystemdNotifier
from agent.offsets import OffsetStore, SaveBarrier, StateFile
from agent.parser import LineContext, SourceParser
from agent.queue import DocumentQueue
from agent.ratelimit import RepeatedFailure
from agent.shipper import Shipper
from agent.spool import SUFFIX, Spool, migrate_folders, spool_folder
from agent.status import Level, StatusFile, assess, render
from agent.supervisor import Failures, Part, describe
from agent.tailer import Tailer, TailerSet
from agent.types import Lines, LineSink, SourceFile
from agent.watcher import Watcher, scan

if TYPE_CHECKING:
    from agent.metrics import Metrics, MetricsServer

log = structlog.get_logger("agent.daemon")

TICK_SECONDS = 1.0
PROGRESS_EVERY = 60.0
STATUS_EVERY = 2.0
"""Seconds between status snapshots (`agent status` calls one older than STALE_AFTER stale)."""
IDLE_STATUS_EVERY = 6.0
"""Seconds between snapshots while nothing is read or sent: then a snapshot is only a sign of
life, and with a thousand files followed, making it is most of what an idle agent does."""
PRUNE_EVERY = 60.0
"""Seconds between looks for offsets old enough to forget (FORGET_AFTER is a day)."""
STATUS_FILES = 10
"""Files listed by name in the status snapshot: the ones furthest behind."""
FORGET_AFTER = 24 * 3600.0
"""Offsets of a file no tailer follows are kept this long, then pruned."""
READ_BUDGET_CHUNKS = 2
"""Chunks (tailer.READ_CHUNK each) read but not yet queued, across all files: a chunk becomes
about four times its size in documents, and a thousand files catching up at once must not
each hold one (issue 13 item 7). Two let one file's read run in its thread while another's
chunk is parsed; one file alone never holds more than one."""
SAVE_GATHER = 0.02
"""Seconds a save a tailer asked for waits for other tailers to ask too (one save for all)."""
STABLE_AFTER = 10.0
"""Seconds a restarted shipper or watcher must run without failing to count as recovered."""
TASKS_WAIT = 5.0
"""Seconds cancelled tasks get to finish at shutdown before the agent stops waiting."""
THREADS_WAIT = 10.0
"""Seconds shutdown waits for work still running in threads (a cancelled `to_thread` call
keeps running) before it closes the spools and writes the offsets; below systemd's stop
timeout."""

P = ParamSpec("P")
T = TypeVar("T")


class _CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor (what `asyncio.to_thread` runs on), counting the calls still
    running: cancelling the awaiting task does not stop a call already in its thread."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="agent")
        self._lock = threading.Lock()
        self.running = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        with self._lock:
            self.running += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _: object = None) -> None:
        with self._lock:
            self.running -= 1


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.started = False
        self.counters = {s.name: SourceCounters() for s in config.sources}
        self.databases: dict[str, list[str]] = {}
        """Each database and the sources that ship to it."""
        for source in sorted(config.sources, key=lambda s: s.database):
            self.databases.setdefault(source.database, []).append(source.name)
        self.offsets = OffsetStore()
        self.state_file = StateFile(config.state_dir)
        self._save_failures = RepeatedFailure(log, "state_save_failed")
        self.save_barrier = SaveBarrier()
        """Tailers wait there, once per file, for a save that can recognize a copy of it."""
        self._saving = asyncio.Lock()
        """One save at a time: the tick's and those tailers ask for write the same temp file."""
        self._saver: asyncio.Task[None] | None = None
        """Saves the offsets when tailers wait for it; stopped once the tailers are."""
        self.status_file = StatusFile(config.state_dir)
        self.started_at = time.time()
        self.queues: dict[str, DocumentQueue] = {}
        self.shippers: dict[str, Shipper] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tailers: TailerSet | None = None
        self._watcher: Watcher | None = None
        self._settled: set[str] = set()
        """Databases whose spool was empty at the last tick, their offsets settled."""
        self._last_status = -IDLE_STATUS_EVERY
        self._next_prune = 0.0
        self._activity = -1
        """What `_activity_count` was at the last snapshot."""
        self.failures = Failures()
        """Tailers, shippers and the watcher failing now, each retried after its backoff."""
        self.read_budget = asyncio.Semaphore(READ_BUDGET_CHUNKS)
        """Held by a tailer from reading a chunk until its documents are queued."""
        self._executor = _CountingExecutor()
        self.notifier = SystemdNotifier()
        """systemd's notify socket (a no-op without NOTIFY_SOCKET)."""
        self._summary = ""
        """The last summary sent as STATUS=."""
        self.metrics: Metrics | None = None
        """Only with `metrics.listen`: the registry costs nothing when nobody scrapes it."""
        self._metrics_server: MetricsServer | None = None
        self._fleet: FleetWriter | None = None
        self._fleet_task: asyncio.Task[None] | None = None
        self._next_fleet = 0.0
        self._fleet_failures = RepeatedFailure(log, "fleet_write_failed")
        self.reload_outcome: dict[str, Any] | None = None
        """The last reload: `{"ok", "at", "problems", "restart_needed"}` (status snapshot)."""
        self._reload_wanted = asyncio.Event()
        self._retiring: set[str] = set()
        """Databases no source ships to any more, kept until their queue and spool are empty."""

    async def run(self) -> None:
        asyncio.get_running_loop().set_default_executor(self._executor)
        with self._capture_signals():
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    await self.startup()
                    await self.main_loop()
                finally:
                    await self.shutdown()

    # -- lifecycle

    async def startup(self) -> None:
        cfg = self.config
        _raise_open_files_limit()
        await asyncio.to_thread(_check_writable, cfg.state_dir)
        if cfg.metrics.listen is not None:
            await self._start_metrics(*cfg.metrics.listen)
        entries, status = await asyncio.to_thread(self.state_file.load)
        self.offsets = OffsetStore(entries)
        # Files there at start that the offsets do not know: a first start follows each source's
        # start_at, a lost state file on_corrupt_state, and otherwise they are new files.
        start_at: dict[str, StartAt] = {
            s.name: s.start_at if status == "absent" else
            cfg.on_corrupt_state if status == "corrupt" else "beginning" for s in cfg.sources}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=connection_limit(cfg.shipping.concurrency, len(self.databases))))
        dead_letter = DeadLetterFile(cfg.state_dir)
        targets = endpoints(cfg.couchdb)
        await asyncio.to_thread(migrate_folders, cfg.state_dir / "spool", list(self.databases))
        for database, sources in self.databases.items():
            spool = Spool(spool_folder(cfg.state_dir / "spool", database), cfg.spool.max_bytes,
                          cfg.spool.segment_bytes, cfg.spool.when_full)
            await asyncio.to_thread(spool.open)
            await self._check_spool(spool, database, sources)
            queue = DocumentQueue(cfg.shipping.queue_max_docs, cfg.shipping.queue_max_bytes)
            shipper = Shipper(database, queue, spool, self._session, targets, cfg.couchdb,
                              cfg.shipping, self.offsets.acknowledge, dead_letter)
            self._add_shipper(database, queue, shipper)
            self._spawn(f"shipper:{database}", self._keep_running(
                ("shipper", database), shipper.run, shipper.spool_remaining))
        await self._open_leftover_spools()
        self._tailers = TailerSet(self._tailer_task, cfg.sources,
                                  {s.name: self._sink(s) for s in cfg.sources}, self.offsets,
                                  start_at, read_budget=self.read_budget,
                                  saves=self.save_barrier)
        self._saver = self._group_task(self._save_when_wanted())
        watcher = Watcher(cfg.sources, self._tailers, cfg.scan_interval, cfg.poll_interval,
                          cfg.state_dir)
        await watcher.start()
        await self._tailers.recover()
        self._watcher = watcher
        self._spawn("watcher", self._keep_running(("watcher",), watcher.run))
        self._spawn("reload", self._reloads())
        self.started = True
        await asyncio.to_thread(self.status_file.write, self.status())
        log.info("agent_started", sources=[s.name for s in cfg.sources], watch=watcher.mode,
                 state=status,
                 databases=sorted(self.queues), state_dir=str(cfg.state_dir),
                 couchdb=[t.url for t in targets], pid=os.getpid(),
                 metrics=(f"{self._metrics_server.host}:{self._metrics_server.port}"
                          if self._metrics_server else None))
        self._summary = self.summary()
        self.notifier.ready(self._summary)
        if cfg.fleet.interval > 0:
            self._fleet = FleetWriter(self._session, [(t.url, t.headers) for t in targets],
                                      cfg.couchdb.request_timeout, ssl=ssl_context(cfg.couchdb))
            self._write_fleet("start")

    def _add_shipper(self, database: str, queue: DocumentQueue, shipper: Shipper) -> None:
        self.queues[database] = queue
        self.shippers[database] = shipper
        if self.metrics is not None:
            shipper.client.observe = functools.partial(self.metrics.observe_request, database)

    async def _start_metrics(self, host: str, port: int) -> None:
        # Imported here: prometheus_client and aiohttp's web server take ~3 MiB resident, and
        # most agents never serve metrics.
        from agent.metrics import Metrics, MetricsServer

        self.metrics = Metrics(self.status)
        server = MetricsServer(host, port, self.metrics, self._health)
        try:
            await server.start()
        except OSError as exc:
            await server.stop()
            raise OSError(exc.errno, f"metrics.listen {host}:{port}: cannot listen there: "
                          f"{exc.strerror or exc}; free the port or choose another") from None
        self._metrics_server = server

    def _health(self) -> tuple[bool, dict[str, Any]]:
        """What `/health` answers: healthy only once started and with nothing `agent status`
        would warn about."""
        snapshot = self.status()
        findings = assess(snapshot, time.time(), self.config.status)
        level = findings[0].level if findings else Level.OK
        if not self.started:
            level = Level.UNKNOWN
        return level is Level.OK, {"health": level.name, "findings": [f.text for f in findings],
                                   **snapshot}

    def summary(self, snapshot: dict[str, Any] | None = None) -> str:
        """One line on how the agent is doing: `agent status`'s first line without its
        performance data (systemd's STATUS=, the fleet document)."""
        text, _ = render(self.status() if snapshot is None else snapshot, self.status_file.path,
                         limits=self.config.status)
        return text.split("\n", 1)[0].split(" | ", 1)[0]

    def _write_fleet(self, event: str) -> None:
        """Write this host's fleet document in the background (one write at a time): a slow
        CouchDB must hold up neither the tick nor shipping."""
        if self._fleet is None or (self._fleet_task is not None and not self._fleet_task.done()):
            return
        self._next_fleet = time.monotonic() + self.config.fleet.interval
        snapshot = self.status()
        findings = assess(snapshot, time.time(), self.config.status)
        health = findings[0].level.name if findings else Level.OK.name
        doc = fleet_document(snapshot, self.config.host, self.config.couchdb.username, health,
                             event)
        doc["summary"] = self.summary(snapshot)
        self._fleet_task = asyncio.create_task(self._fleet_write(self._fleet, doc))

    async def _fleet_write(self, writer: FleetWriter, doc: dict[str, Any]) -> None:
        try:
            error = await writer.write(doc)
        except Exception as exc:
            error = describe(exc)
        if error is None:
            self._fleet_failures.succeeded(database=writer.database)
        else:
            self._fleet_failures.failed(
                database=writer.database, error=error,
                action=f"run `agent setup` to create {fleet.DATABASE} and its rules, and check "
                "that the agent's user has role couchlog_agent; shipping is not affected")

    async def _check_spool(self, spool: Spool, database: str, sources: list[str]) -> None:
        """A spool that lost documents (damaged, or gone while the offsets say some were only
        there) sends its sources back to where CouchDB had every line: lost lines are read
        again from the log files, and CouchDB answers the others with conflict. The spool's
        damage mark goes only once the rewound offsets are saved."""
        lost = spool.damaged or (spool.pending == 0 and any(
            p.delivered is None or p.delivered[0] < p.committed
            for f, p in self.offsets.files.items() if f.source in sources and p.committed))
        if lost:
            moved = self.offsets.rewind(sources)
            if moved:
                log.warning("spool_lost_documents", database=database, files=len(moved),
                            action="reading those files again from the last offsets known "
                            "to be in CouchDB")
        if spool.damaged:
            await self._save_offsets()
            if not self.offsets.dirty:
                await asyncio.to_thread(spool.clear_damage)

    async def main_loop(self) -> None:
        last_progress = time.monotonic()
        while not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS):
                    await self.should_exit.wait()
            await self.on_tick()
            if time.monotonic() - last_progress >= PROGRESS_EVERY:
                last_progress = time.monotonic()
                self._log_progress()

    async def on_tick(self) -> None:
        """All periodic work: note what is all in CouchDB, write offsets that moved, forget
        long-gone files, notice failed parts that work again."""
        if self.failures:
            self._check_recovered()
        for database, sources in self.databases.items():
            spool = self.shippers[database].spool
            # A record lost while running: never settle past it; the next start reads again.
            if spool.pending or spool.damaged:
                self._settled.discard(database)
            elif self.offsets.dirty or database not in self._settled:
                self.offsets.settle(self._settleable(sources))
                self._settled.add(database)
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            self.offsets.prune(time.time() - FORGET_AFTER)
        if self._retiring:
            await self._retire_drained()
        if self.offsets.dirty:
            await self._save_offsets()
        activity = self._activity_count()
        since = now - self._last_status
        if since >= IDLE_STATUS_EVERY or (since >= STATUS_EVERY and activity != self._activity):
            self._last_status, self._activity = now, activity
            snapshot = self.status()
            await asyncio.to_thread(self.status_file.write, snapshot)
            if self.started and not self.should_exit.is_set():
                summary = self.summary(snapshot)
                if summary != self._summary:
                    self._summary = summary
                    self.notifier.status(summary)
        if self._fleet is not None and now >= self._next_fleet and not self.should_exit.is_set():
            self._write_fleet("tick")
        # From here only: the tick ran to its end, so the loop makes progress. A loop stuck
        # on a hung disk or in a blocking call sends nothing, and systemd restarts the agent.
        if self.notifier.watchdog_interval is not None and not self.should_exit.is_set():
            self.notifier.watchdog()

    def _activity_count(self) -> int:
        """Grows whenever a line is read or a request is sent."""
        return (sum(c.lines for c in self.counters.values())
                + sum(s.stats.requests + s.stats.spooled for s in self.shippers.values()))

    async def _save_offsets(self) -> None:
        async with self._saving:
            number = self.save_barrier.taking()
            try:
                await asyncio.to_thread(self.state_file.save, self.offsets.snapshot())
            except OSError as exc:
                self.offsets.dirty = True
                self.save_barrier.failed(str(exc))
                self._save_failures.failed(
                    path=str(self.state_file.path), error=str(exc),
                    action="free space or fix permissions there; until then a restart reads "
                    "again from the last saved offsets (nothing is lost or doubled), and new "
                    "files are not shipped")
            else:
                self.save_barrier.saved(number)
                self._save_failures.succeeded(path=str(self.state_file.path))

    async def _save_when_wanted(self) -> None:
        """Save the offsets as soon as a tailer waits for it, not at the next tick; the
        tailers that come meanwhile share the save (a thousand new files: a few saves)."""
        while True:
            await self.save_barrier.wanted.wait()
            await asyncio.sleep(SAVE_GATHER)
            self.save_barrier.wanted.clear()
            await self._save_offsets()

    async def shutdown(self) -> None:
        log.info("agent_stopping", force=self.force_exit)
        self.notifier.stopping()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        await self._stop_reloading()
        # The watcher first and waited for: its observer thread must not hand hints to
        # tailers that are going away.
        watcher = self._tasks.get("watcher")
        if watcher is not None:
            watcher.cancel("agent stopping: reading stops first")
            await self._settle_tasks([watcher])
        if self._tailers is not None:
            await self._tailers.stop()
        if self._saver is not None:
            self._saver.cancel("agent stopping: no tailer waits for a save any more")
            await self._settle_tasks([self._saver])
        reason = "agent stopping"
        if not self.force_exit and not await self._drain():
            reason = "agent stopping: shutdown_timeout passed"
        await self._cancel_remaining(reason)
        # A cancelled `to_thread` call (a read, a spool append) is still running: the spools
        # and the state file are closed and written only once nothing uses them.
        await self._wait_for_threads()
        for shipper in self.shippers.values():
            await shipper.spool_remaining()
            await asyncio.to_thread(shipper.spool.close)
        if self.started:
            await self.on_tick()
        if self.started or self.offsets.dirty:
            await self._save_offsets()
        await self._last_fleet_write()
        if self._session is not None:
            await self._session.close()
        self.notifier.close()
        self._log_progress()
        log.info("agent_stopped", outstanding=self.offsets.outstanding())

    async def _last_fleet_write(self) -> None:
        """The `stop` fleet document, after any write still running; bounded like the other
        waits of a stop."""
        if self._fleet is None:
            return
        try:
            async with asyncio.timeout(TASKS_WAIT):
                if self._fleet_task is not None:
                    await self._fleet_task
                self._write_fleet("stop")
                if self._fleet_task is not None:
                    await self._fleet_task
        except TimeoutError:
            if self._fleet_task is not None:
                self._fleet_task.cancel("agent stopping")
            log.warning("fleet_write_abandoned", waited=TASKS_WAIT,
                        action="the fleet document shows the last tick; nothing else is affected")

    async def _drain(self) -> bool:
        """Give the shippers up to `shutdown_timeout` to deliver what is queued; False if they
        did not."""
        deadline = time.monotonic() + self.config.shutdown_timeout
        while not all(s.idle for s in self.shippers.values()):
            if self.force_exit or time.monotonic() >= deadline:
                log.warning("shutdown_deadline", undelivered=self.offsets.outstanding(),
                            action="spooling what is left; it is sent at the next start")
                return False
            await asyncio.sleep(0.05)
        return True

    async def _cancel_remaining(self, reason: str) -> None:
        """Cancel every task still running (the shippers, which loop until cancelled), say how
        many and why, and give them TASKS_WAIT to finish."""
        remaining = [t for t in self._tasks.values() if not t.done()]
        for task in remaining:
            task.cancel(reason)
        if remaining:
            log.info("tasks_cancelled", count=len(remaining), reason=reason)
        await self._settle_tasks(remaining)

    async def _settle_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        try:
            async with asyncio.timeout(TASKS_WAIT):
                await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            log.warning("tasks_still_running", count=sum(not t.done() for t in tasks),
                        waited=TASKS_WAIT, action="stopping without them")

    async def _wait_for_threads(self) -> None:
        deadline = time.monotonic() + THREADS_WAIT
        while self._executor.running:
            if time.monotonic() >= deadline:
                log.warning("threads_still_running", count=self._executor.running,
                            waited=THREADS_WAIT,
                            action="a read or write is stuck (a hung disk or NFS mount?); "
                            "stopping anyway: what is not in the saved offsets is read again "
                            "at the next start")
                return
            await asyncio.sleep(0.01)

    # -- supervision: one part's failure is that part's problem

    def _tailer_task(self, tailer: Tailer) -> asyncio.Task[None]:
        """How the TailerSet starts a tailer: supervised."""
        return self._group_task(self._supervise_tailer(tailer))

    async def _supervise_tailer(self, tailer: Tailer) -> None:
        """Run one tailer; if it fails, record it and hold its place (so no scan opens the
        file again) until the backoff has passed. Its offsets were kept when it let go of
        the file: the next tailer for it resumes from them."""
        try:
            await tailer.run()
        except Exception as exc:
            source, path = tailer.source.name, tailer.path
            failure = self.failures.failed(("file", source, path), describe(exc), time.time(),
                                           tailer.reference()[0], holder=tailer)
            log.error("tailer_failed", source=source, path=path, error=failure.error,
                      failures=failure.count, retry_in=round(failure.retry_at - time.time(), 1),
                      action="this file is read again from its last committed offset after "
                      "the backoff; other files go on. If it keeps failing, check the disk "
                      "or mount it is on", exc_info=not isinstance(exc, OSError))
            await asyncio.sleep(max(failure.retry_at - time.time(), 0.0))

    async def _keep_running(self, part: Part, run: Callable[[], Awaitable[None]],
                            reset: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run a part that runs until cancelled (a shipper, the watcher), and start it again
        after a backoff whenever it fails. `reset` first puts down what the failed run held
        (a shipper spools its batches in hand and in flight: spooled is safe, and the spool is
        replayed once it runs again)."""
        while True:
            try:
                await run()
                return
            except Exception as exc:
                failure = self.failures.failed(part, describe(exc), time.time())
                retry_at = failure.retry_at
                log.error(f"{part[0]}_failed", **_where(part), error=failure.error,
                          failures=failure.count, retry_in=round(failure.retry_at - time.time(), 1),
                          action=f"restarting the {part[0]} after the backoff; everything else "
                          "goes on", exc_info=not isinstance(exc, OSError))
            if reset is not None:
                try:
                    await reset()
                except Exception as exc:
                    log.error(f"{part[0]}_reset_failed", **_where(part), error=describe(exc),
                              action="restarting it anyway; what it held is read again from the "
                              "log files at the next start", exc_info=not isinstance(exc, OSError))
            await asyncio.sleep(max(retry_at - time.time(), 0.0))

    def _check_recovered(self) -> None:
        """Forget failures of parts that work again: a file whose new tailer read past where
        the failed one stopped (or caught up), a shipper or watcher restarted STABLE_AFTER ago
        and not failed since. A failed file nobody follows any more is forgotten too."""
        now = time.time()
        live: dict[Part, Tailer] = {
            ("file", t.source.name, t.path): t
            for t in (self._tailers.live.values() if self._tailers else ())}
        for part, failure in list(self.failures.current.items()):
            if now < failure.retry_at:
                continue
            if part[0] != "file":
                if now >= failure.retry_at + STABLE_AFTER:
                    self.failures.recovered(part)
                    log.info(f"{part[0]}_recovered", **_where(part), failures=failure.count)
                continue
            tailer = live.get(part)
            if tailer is None or tailer is failure.holder:
                if tailer is None and now >= failure.retry_at + 2 * self.config.scan_interval + 5:
                    self.failures.recovered(part)
                    log.info("tailer_failure_forgotten", **_where(part),
                             reason="the file is no longer followed")
                continue
            position = tailer.reference()[0]
            if tailer.file is not None and (position > failure.position
                                            or 0 <= tailer.seen_size <= position):
                self.failures.recovered(part)
                log.info("tailer_recovered", **_where(part), offset=position,
                         failures=failure.count)

    # -- wiring between stages

    def _sink(self, source: SourceConfig) -> LineSink:
        parser = SourceParser(source, self.config.host, self.counters[source.name])
        queue = self.queues[source.database]
        offsets = self.offsets

        async def sink(file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
            read_at = datetime.now(UTC).isoformat(timespec="milliseconds")
            docs = parser.documents(lines, LineContext(file, path, read_at))
            offsets.expect(file, [d.end for d in docs], lines.ends[-1], end_marker)
            await queue.put(docs)

        return sink

    # -- tasks and signals

    def _group_task(self, coro: object) -> asyncio.Task[None]:
        assert self._group is not None
        return self._group.create_task(coro)  # type: ignore[arg-type]

    def _spawn(self, name: str, coro: object) -> None:
        self._tasks[name] = self._group_task(coro)

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handled: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, self.handle_exit, sig)
        handled += (signal.SIGHUP,)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int = signal.SIGTERM) -> None:
        if self.should_exit.is_set():
            self.force_exit = True
        self.should_exit.set()
        log.info("signal_received", signal=signal.Signals(sig).name, force=self.force_exit)

    def handle_reload(self) -> None:
        """SIGHUP: re-read the configuration (in the reload task; a signal only sets state)."""
        log.info("signal_received", signal="SIGHUP")
        self._reload_wanted.set()

    # -- reload

    async def _reloads(self) -> None:
        """One reload at a time; signals during one make one more after it."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload()

    async def _stop_reloading(self) -> None:
        """At shutdown, before reading stops: no reload may start tailers or shippers then."""
        task = self._tasks.pop("reload", None)
        if task is not None:
            task.cancel("agent stopping")
            await self._settle_tasks([task])

    async def reload(self) -> None:
        """Re-read the configuration and apply it, or refuse it whole and go on as before."""
        self.notifier.reloading()
        at = time.time()
        path = self.config.path
        log.info("reload_started", config=str(path))
        try:
            plan = await asyncio.to_thread(reload_module.load, self.config, path)
        except Exception as exc:
            problems = ([str(p) for p in exc.problems] if isinstance(exc, ConfigError) else
                        [f"{path}: cannot be loaded: {describe(exc)}"])
            log.error("reload_failed", config=str(path), problems=problems,
                      action="fix these (`agent check -c CONFIG` shows them) and reload again; "
                      "the agent goes on with the configuration it runs")
            self.reload_outcome = {"ok": False, "at": at, "problems": problems}
        else:
            try:
                await self._apply(plan)
            except Exception as exc:
                log.error("reload_failed", config=str(path), problems=[describe(exc)],
                          action="the configuration may be applied in part: restart the agent "
                          "(nothing is lost or doubled: offsets and spools are kept)",
                          exc_info=not isinstance(exc, OSError))
                self.reload_outcome = {"ok": False, "at": at, "problems": [describe(exc)]}
            else:
                self.reload_outcome = {"ok": True, "at": at, "problems": [],
                                       "restart_needed": list(plan.restart_only)}
        await asyncio.to_thread(self.status_file.write, self.status())
        # Applied or refused, the agent runs (systemd waits for READY=1 after RELOADING=1).
        self.notifier.ready(self.summary())

    async def _apply(self, plan: reload_module.ReloadPlan) -> None:
        """Stop what the new configuration removes or changes, open the new databases, then
        start the sources added or changed (module docstring)."""
        assert self._tailers is not None
        for warning in plan.config.warnings:
            log.warning("config_warning", file=str(warning.file), key=warning.key,
                        message=warning.message)
        if plan.restart_only:
            log.warning("reload_restart_needed", keys=list(plan.restart_only),
                        action="these settings keep their running values until the agent "
                        "restarts; everything else is applied now")
        start_at = {n: self._tailers.start_at.get(n, "beginning") for n in plan.changed}
        start_at.update({n: plan.source(n).start_at for n in plan.added})
        stopped = await self._tailers.stop_sources(plan.restarted)
        self.config = plan.config
        databases: dict[str, list[str]] = {}
        for source in sorted(plan.config.sources, key=lambda s: s.database):
            databases.setdefault(source.database, []).append(source.name)
        for database in databases:
            self._retiring.discard(database)
            if database not in self.shippers:
                await self._open_database(database)
        for database, sources in self.databases.items():
            if database not in databases:
                # What is queued or spooled for it still goes there; a source that moved
                # settles only once both its databases' spools are empty (`_settleable`).
                databases[database] = sources
                self._retiring.add(database)
        self.databases = databases
        started = plan.added + plan.changed
        for name in plan.added:
            self.counters[name] = SourceCounters()
        self._tailers.add_sources([plan.source(n) for n in started],
                                  {n: self._sink(plan.source(n)) for n in started},
                                  start_at, plan.added)
        if self._watcher is not None:
            self._watch_sources(self._watcher, plan)
        if started:
            found, skipped = await asyncio.to_thread(
                scan, [plan.source(n) for n in started], self.config.state_dir)
            self._tailers.reconcile(found, started, skipped)
            await self._tailers.recover()
        log.info("reload_done", added=list(plan.added), removed=list(plan.removed),
                 changed=list(plan.changed), tailers_restarted=stopped,
                 databases=sorted(self.databases), retiring=sorted(self._retiring))

    def _watch_sources(self, watcher: Watcher, plan: reload_module.ReloadPlan) -> None:
        """Hand the watcher the new sources; its next full rescan adds the inotify watches
        for new folders (the reload scans the new sources at once meanwhile)."""
        fell_back = any(s.watch != "poll" and s.name in watcher.polled for s in watcher.sources)
        watcher.sources = list(plan.config.sources)
        watcher.polled = {s.name for s in plan.config.sources if s.watch == "poll" or fell_back}

    async def _open_leftover_spools(self) -> None:
        """Spools of databases no source ships to any more that still hold documents (a reload
        moved or removed their sources, and the agent stopped before they were delivered):
        delivered there as after that reload, then retired."""
        cfg = self.config
        found = await asyncio.to_thread(_spooled_databases, cfg.state_dir / "spool")
        for database in sorted(found - set(self.shippers)):
            spool = Spool(spool_folder(cfg.state_dir / "spool", database), cfg.spool.max_bytes,
                          cfg.spool.segment_bytes, cfg.spool.when_full)
            await asyncio.to_thread(spool.open)
            if not spool.pending:
                await asyncio.to_thread(spool.close)
                continue
            log.info("leftover_spool", database=database, records=spool.pending,
                     action="delivering them to that database, then stopping its shipper")
            await self._open_database(database, spool)
            self.databases[database] = []
            self._retiring.add(database)

    async def _open_database(self, database: str, spool: Spool | None = None) -> None:
        """A new database: its spool (what an earlier run left there is sent first), queue and
        shipper, as at start."""
        cfg = self.config
        assert self._session is not None
        if spool is None:
            spool = Spool(spool_folder(cfg.state_dir / "spool", database), cfg.spool.max_bytes,
                          cfg.spool.segment_bytes, cfg.spool.when_full)
            await asyncio.to_thread(spool.open)
        queue = DocumentQueue(cfg.shipping.queue_max_docs, cfg.shipping.queue_max_bytes)
        shipper = Shipper(database, queue, spool, self._session, endpoints(cfg.couchdb),
                          cfg.couchdb, cfg.shipping, self.offsets.acknowledge,
                          DeadLetterFile(cfg.state_dir))
        self._add_shipper(database, queue, shipper)
        self._spawn(f"shipper:{database}", self._keep_running(
            ("shipper", database), shipper.run, shipper.spool_remaining))
        log.info("database_added", database=database)

    def _settleable(self, sources: list[str]) -> list[str]:
        """Of these sources, those no other database still holds spooled documents of (a
        source a reload moved ships to two until the old one retires)."""
        if not self._retiring:
            return sources
        busy = {name for database, names in self.databases.items()
                if (spool := self.shippers[database].spool).pending or spool.damaged
                for name in names}
        return [name for name in sources if name not in busy]

    async def _retire_drained(self) -> None:
        """Stop the shippers of databases no source ships to once they delivered all (at
        shutdown they stop with the others)."""
        if self.should_exit.is_set():
            return
        for database in sorted(self._retiring):
            shipper = self.shippers[database]
            if not shipper.idle or shipper.spool.pending or shipper.spool.damaged:
                continue
            task = self._tasks.pop(f"shipper:{database}", None)
            if task is not None:
                task.cancel("reload: no source ships to this database any more")
                await self._settle_tasks([task])
            await shipper.spool_remaining()
            await asyncio.to_thread(shipper.spool.close)
            self._retiring.discard(database)
            self._settled.discard(database)
            del self.shippers[database], self.queues[database], self.databases[database]
            log.info("database_retired", database=database,
                     reason="no source ships to it any more, and all it held is delivered")

    def status(self) -> dict[str, Any]:
        """The snapshot `agent status` explains (small: it is written every second)."""
        sources: dict[str, dict[str, Any]] = {
            s.name: {"counters": self.counters[s.name].as_dict(), "files": 0, "lag": 0, "behind": []}
            for s in self.config.sources}
        for tailer in self._tailers.live.values() if self._tailers else ():
            progress = self.offsets.get(tailer.file) if tailer.file else None
            lag = max(tailer.seen_size - (progress.committed if progress else 0), 0)
            entry = sources[tailer.source.name]
            entry["files"] += 1
            entry["lag"] += lag
            if lag:
                entry["behind"].append({"path": tailer.path, "lag": lag})
        for entry in sources.values():
            entry["behind"] = sorted(entry["behind"], key=lambda f: -f["lag"])[:STATUS_FILES]
        failing = []
        for part, failure in self.failures.current.items():
            where = _where(part)
            if part[0] == "file" and where["source"] in sources:
                sources[where["source"]].setdefault("failing", []).append(
                    {"path": where["path"], "error": failure.error, "since": failure.since})
            else:
                failing.append({"part": part[0], **where, **failure.as_dict()})
        barrier = self.save_barrier
        if barrier.error is not None and barrier.failing_since is not None:
            failing.append({
                "part": "offsets", "since": barrier.failing_since, "retry": "saved again at each tick",
                "failures": self._save_failures.failures,
                "error": f"cannot save {self.state_file.path}: {barrier.error}; "
                         f"{barrier.waiting} file(s) wait for it before their lines are shipped"})
        return {
            "pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
            "watch": self._watcher.mode if self._watcher else "starting",
            "sources": sources,
            "failing": failing,
            **({"reload": self.reload_outcome} if self.reload_outcome is not None else {}),
            "databases": {
                db: {"healthy": sh.health is Health.OK, "queued": len(self.queues[db]),
                     "spool_records": sh.spool.pending, "spool_bytes": sh.spool.stats.bytes,
                     **dataclasses.asdict(sh.stats),
                     "spool": dataclasses.asdict(sh.spool.stats)}
                for db, sh in self.shippers.items()},
        }

    def _log_progress(self) -> None:
        for name, counters in self.counters.items():
            log.info("source_progress", source=name, **counters.as_dict())
        for database, shipper in self.shippers.items():
            log.info("shipper_progress", database=database, queued=len(self.queues[database]),
                     **dataclasses.asdict(shipper.stats))


def _where(part: Part) -> dict[str, str]:
    """A failing part as log and status fields."""
    names = {"file": ("source", "path"), "shipper": ("database",)}.get(part[0], ())
    return dict(zip(names, part[1:], strict=True))


def _spooled_databases(root: Path) -> set[str]:
    """The databases whose spool folder under `root` holds segment files. Blocking.

    A spool root that cannot be listed gives none: that is the spools' problem, reported
    (and survived) when each configured one is used."""
    try:
        return {unquote(p.name) for p in root.iterdir()
                if p.is_dir() and any(p.glob(f"*{SUFFIX}"))}
    except OSError:
        return set()


def _check_writable(state_dir: Path) -> None:
    """Fail at start, not at the first offsets save, if the state folder cannot be written.
    Blocking."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".write-check-"):
        pass


def _raise_open_files_limit() -> None:
    """One descriptor per followed file: take the hard limit, as systemd's 1024 soft default
    would stop the agent at about a thousand files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open_files_limit_raised", soft=soft, now=hard)
