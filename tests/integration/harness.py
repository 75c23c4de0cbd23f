"""A pipeline under test: real files, the real `agent run`, the real server; and the exact check."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB


def message(raw: bytes, encoding: str = "utf-8") -> str | None:
    """What the agent stores for a line written as `raw` (no line ending), or None if skipped."""
    text = raw.removesuffix(b"\r").decode(encoding, errors="replace").removeprefix("\ufeff")
    return text if text.strip() else None


def messages_in(data: bytes, complete_only: bool = True) -> Counter[str]:
    """The documents a file's bytes must give, one per line; the unterminated last line counts
    only when `complete_only` is False (the file was finished)."""
    parts = data.split(b"\n")
    last = parts.pop()
    if last and not complete_only:
        parts.append(last)
    return Counter(m for m in (message(p) for p in parts) if m is not None)


class Pipeline:
    def __init__(self, root: Path, couch: CouchDB, couchdb_url: str, database: str,
                 sources: list[dict[str, Any]], **main: Any) -> None:
        self.couch = couch
        self.database = database
        for source in sources:
            source.setdefault("database", database)
            source.setdefault("schema", "$msg...")
            source.setdefault("rotate_wait", "300ms")
        self.config = write_config(root / "etc", couchdb_url, sources, **main)
        self.agent = AgentProcess(self.config)
        self.expected: Counter[str] | None = None

    def start(self) -> Pipeline:
        self.agent.start()
        self.agent.wait_started()
        return self

    def stop(self) -> None:
        """SIGTERM; then, once the agent has drained, the last check again: nothing arrived late."""
        code = self.agent.stop()
        assert code == 0, f"agent exited with {code}:\n{self.agent.log()[-3000:]}"
        if self.expected is not None:
            self.assert_exact(self.expected)

    def restart(self) -> None:
        self.stop()
        self.start()

    def messages(self) -> Counter[str]:
        return Counter(str(doc["msg"]) for doc in self.couch.docs(self.database))

    def wait_for(self, expected: Counter[str], timeout: float = 60) -> None:
        """Wait until the database holds as many documents as expected, then check exactly."""
        self.expected = Counter(expected)
        total = sum(expected.values())
        try:
            wait_for(lambda: self.couch.count(self.database) >= total, timeout,
                     f"{total} documents in {self.database}", interval=0.2)
        finally:
            self.assert_exact(expected)

    def assert_exact(self, expected: Counter[str]) -> None:
        stored = self.messages()
        missing, extra = expected - stored, stored - expected
        assert not missing and not extra, (
            f"{sum(missing.values())} missing, e.g. {list(missing)[:3]}; "
            f"{sum(extra.values())} extra, e.g. {list(extra)[:3]}\nagent log tail:\n"
            f"{self.agent.log()[-3000:]}")

    def open_fds(self) -> list[str]:
        """What the agent process has open, as /proc shows it."""
        assert self.agent.process is not None
        folder = f"/proc/{self.agent.process.pid}/fd"
        targets = []
        for fd in os.listdir(folder):
            try:
                targets.append(os.readlink(os.path.join(folder, fd)))
            except OSError:
                continue
        return targets


def append(path: Path, lines: Iterable[str], ending: str = "\n") -> Counter[str]:
    """Append lines as a logger does (unbuffered writes); return their expected messages."""
    written: Counter[str] = Counter()
    with path.open("ab", buffering=0) as log:
        for text in lines:
            log.write((text + ending).encode())
            m = message(text.encode())
            if m is not None:
                written[m] += 1
    return written


def numbered(prefix: str, start: int, count: int) -> list[str]:
    return [f"{prefix} line {n:07d} {'x' * (n % 40)}" for n in range(start, start + count)]


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def pipeline(tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
             *sources: dict[str, object], **main: object) -> Pipeline:
    """A Pipeline of `sources`, named s0, s1, ... in order."""
    return Pipeline(tmp_path, couch, couchdb_url, database,
                    [{"name": f"s{i}", **s} for i, s in enumerate(sources)], **main)


def events(flow: Pipeline, name: str) -> list[dict[str, Any]]:
    """The `name` events of the agent's JSON log, in order."""
    found = []
    for line in flow.agent.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            found.append(entry)
    return found
