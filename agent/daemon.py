"""The `Agent`: owns every long-lived task, starts the stages, ticks, and stops them in reverse.

Life of the process, as in uvicorn's `Server`: `startup()` (offsets,
shippers, queues, then tailers and the watcher: downstream first),
`main_loop()` (one housekeeping tick: offsets, progress logs), and
`shutdown()` (reading stops first, then the queues drain within
`shutdown_timeout`, then the offsets are written one last time). Signal
handlers only set `should_exit`; a second signal sets `force_exit`, which
skips the drain but still writes the offsets already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from agent.config import AgentConfig, SourceConfig, StartAt
from agent.couchdb import connection_limit, endpoints
from agent.counters import SourceCounters
from agent.deadletter import DeadLetterFile
from agent.health import Health
from agent.offsets import OffsetStore, StateFile
from agent.parser import LineContext, SourceParser
from agent.queue import DocumentQueue
from agent.ratelimit import RepeatedFailure
from agent.shipper import Shipper
from agent.spool import Spool, migrate_folders, spool_folder
from agent.status import StatusFile
from agent.tailer import TailerSet
from agent.types import Lines, LineSink, SourceFile
from agent.watcher import Watcher

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

    async def run(self) -> None:
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
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
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
            self.queues[database] = queue
            self.shippers[database] = shipper
            self._spawn(f"shipper:{database}", shipper.run())
        self._tailers = TailerSet(self._group_task, cfg.sources,
                                  {s.name: self._sink(s) for s in cfg.sources}, self.offsets,
                                  start_at)
        watcher = Watcher(cfg.sources, self._tailers, cfg.scan_interval, cfg.poll_interval,
                          cfg.state_dir)
        await watcher.start()
        await self._tailers.recover()
        self._watcher = watcher
        self._spawn("watcher", watcher.run())
        self.started = True
        await asyncio.to_thread(self.status_file.write, self.status())
        log.info("agent_started", sources=[s.name for s in cfg.sources], watch=watcher.mode,
                 state=status,
                 databases=sorted(self.queues), state_dir=str(cfg.state_dir),
                 couchdb=[t.url for t in targets], pid=os.getpid())

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
        long-gone files."""
        for database, sources in self.databases.items():
            spool = self.shippers[database].spool
            # A record lost while running: never settle past it; the next start reads again.
            if spool.pending or spool.damaged:
                self._settled.discard(database)
            elif self.offsets.dirty or database not in self._settled:
                self.offsets.settle(sources)
                self._settled.add(database)
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            self.offsets.prune(time.time() - FORGET_AFTER)
        if self.offsets.dirty:
            await self._save_offsets()
        activity = self._activity_count()
        since = now - self._last_status
        if since >= IDLE_STATUS_EVERY or (since >= STATUS_EVERY and activity != self._activity):
            self._last_status, self._activity = now, activity
            await asyncio.to_thread(self.status_file.write, self.status())

    def _activity_count(self) -> int:
        """Grows whenever a line is read or a request is sent."""
        return (sum(c.lines for c in self.counters.values())
                + sum(s.stats.requests + s.stats.spooled for s in self.shippers.values()))

    async def _save_offsets(self) -> None:
        try:
            await asyncio.to_thread(self.state_file.save, self.offsets.snapshot())
        except OSError as exc:
            self.offsets.dirty = True
            self._save_failures.failed(
                path=str(self.state_file.path), error=str(exc),
                action="free space or fix permissions there; until then a restart reads "
                "again from the last saved offsets (nothing is lost or doubled)")
        else:
            self._save_failures.succeeded(path=str(self.state_file.path))

    async def shutdown(self) -> None:
        log.info("agent_stopping", force=self.force_exit)
        self._cancel("watcher")
        if self._tailers is not None:
            await self._tailers.stop()
        if not self.force_exit:
            await self._drain()
        for name in [n for n in self._tasks if n.startswith("shipper:")]:
            self._cancel(name)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for shipper in self.shippers.values():
            await shipper.spool_remaining()
            await asyncio.to_thread(shipper.spool.close)
        await self.on_tick()
        await self._save_offsets()
        if self._session is not None:
            await self._session.close()
        self._log_progress()
        log.info("agent_stopped", outstanding=self.offsets.outstanding())

    async def _drain(self) -> None:
        """Give the shippers up to `shutdown_timeout` to deliver what is queued."""
        deadline = time.monotonic() + self.config.shutdown_timeout
        while not all(s.idle for s in self.shippers.values()):
            if self.force_exit or time.monotonic() >= deadline:
                log.warning("shutdown_deadline", undelivered=self.offsets.outstanding(),
                            action="spooling what is left; it is sent at the next start")
                return
            await asyncio.sleep(0.05)

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

    def _cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None:
            task.cancel("agent stopping")

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, self.handle_exit, sig)
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
        return {
            "pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
            "watch": self._watcher.mode if self._watcher else "starting",
            "sources": sources,
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


def _raise_open_files_limit() -> None:
    """One descriptor per followed file: take the hard limit, as systemd's 1024 soft default
    would stop the agent at about a thousand files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open_files_limit_raised", soft=soft, now=hard)
