"""A kill -9 leaves the saved committed offset behind the lines already in CouchDB (the save
that let the file's documents go holds its read mark, not their acks). If the file is then
truncated and written again while the agent is down, starting with the same first line (a
banner), its fingerprint and committed offset still agree: the next start must see from the
saved read mark that the file no longer holds what was shipped, or it reuses the old lines'
ids for new lines, and CouchDB answers conflict for them (lost).

Deterministic: the saves after the one that covers the file are dropped, which is what the
disk holds after a kill -9 right after that save."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_module
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.offsets import StateFile
from tests.agentproc import write_config
from tests.couch import CouchDB
from tests.integration.harness import append, numbered

pytestmark = pytest.mark.integration


async def run_until_read(config: AgentConfig, log: Path) -> None:
    """Run the agent until every line of `log` is acknowledged (stored, or answered conflict),
    then stop it."""
    agent = Agent(config)
    run = asyncio.create_task(agent.run())
    size = log.stat().st_size
    try:
        async with asyncio.timeout(120):  # a bound for a hung agent, not a timing check
            while not any(p.live and p.committed == size for p in agent.offsets.files.values()):
                assert not run.done(), run
                await asyncio.sleep(0.1)
    finally:
        agent.handle_exit()
        await run


async def test_a_file_rewritten_with_the_same_first_line_after_a_kill_9_reuses_no_ids(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = logs / "app.log"
    banner = "app 1.2.3 starting, pid 4242"
    written = append(log, [banner, *numbered("old", 0, 300)])
    config = config_module.load(write_config(tmp_path / "etc", couchdb_url, [
        {"name": "s", "database": database, "paths": [str(log)], "schema": "$msg..."}]))
    save, killed = StateFile.save, False

    def until_the_file_is_covered(self: StateFile, snapshot: dict[str, Any]) -> None:
        nonlocal killed
        if not killed:
            save(self, snapshot)
            killed = any("read" in entry for entry in snapshot["files"].values())

    monkeypatch.setattr(StateFile, "save", until_the_file_is_covered)
    await run_until_read(config, log)
    monkeypatch.undo()
    saved = json.loads((config.state_dir / "offsets.json").read_bytes())["files"]
    assert [(e["offset"], "read" in e) for e in saved.values()] == [(0, True)], saved
    assert await asyncio.to_thread(couch.count, database) == sum(written.values())
    # While the agent is down: truncated (`> app.log`, or copy-truncate with the copy out of
    # the globs) and written again by the application, which starts with its banner.
    os.truncate(log, 0)
    written += append(log, [banner, *numbered("new", 0, 300)])
    await run_until_read(config, log)
    stored = Counter(str(doc["msg"]) for doc in await asyncio.to_thread(couch.docs, database))
    missing, extra = written - stored, stored - written
    assert not missing and not extra, (f"{sum(missing.values())} missing, e.g. {list(missing)[:3]}; "
                                       f"{sum(extra.values())} extra")
