"""A full state disk is a state, not a crash: the real agent, its state_dir on a tiny tmpfs that
fills up while it ships. Shipping goes on (exactly), the status and offsets failures are logged
once each (rate-limited), their recovery is logged, and the agent stops cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.integration.harness import Pipeline, append, numbered
from tests.tmpfs import fill, tmpfs

pytestmark = pytest.mark.integration


def test_a_full_state_disk_never_stops_the_agent(tmp_path: Path, couch: CouchDB,
                                                 couchdb_url: str, database: str) -> None:
    log_file = tmp_path / "app.log"
    log_file.touch()
    with tmpfs("256k") as state:
        pipeline = Pipeline(tmp_path, couch, couchdb_url, database,
                            [{"name": "app", "paths": [str(log_file)]}], state_dir=str(state))
        pipeline.start()
        agent = pipeline.agent
        expected = append(log_file, numbered("before", 0, 100))
        pipeline.wait_for(expected)

        filler = fill(state)
        expected += append(log_file, numbered("full", 0, 200))
        pipeline.wait_for(expected)
        wait_for(lambda: not agent.running() or ('"status_write_failed"' in agent.log()
                                                 and '"state_save_failed"' in agent.log()),
                 60, "the failed writes to be logged")
        assert agent.running(), f"the agent stopped on a full disk:\n{agent.log()[-3000:]}"
        expected += append(log_file, numbered("still full", 0, 200))
        pipeline.wait_for(expected)

        filler.unlink()
        wait_for(lambda: '"status_write_recovered"' in agent.log()
                 and '"state_save_recovered"' in agent.log(), 60, "the recovery to be logged")
        expected += append(log_file, numbered("after", 0, 100))
        pipeline.wait_for(expected)
        pipeline.stop()
        log = agent.log()
        # Failing on every tick for seconds, logged once each: the summary comes after a minute.
        assert log.count('"status_write_failed"') == 1 and log.count('"state_save_failed"') == 1
        assert '"agent_failed"' not in log and "Traceback" not in log
