"""Hostile lines end to end: the real `agent run` keeps shipping through lines that used to crash
it (JSON nested 300 deep) or freeze it (a catastrophic regex), and stores exactly one document
per line, with no field lost to renaming.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB

pytestmark = pytest.mark.integration

DEEP = '{"deep":' + "[" * 300 + "]" * 300 + "}"
EVIL = "a" * 40 + "b"


def canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True)


@pytest.mark.timeout(180)
def test_bad_lines_are_stored_raw_and_every_field_survives(
        tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.json").write_text("\n".join([
        '{"n": 1}', DEEP, '{"_id": "evil", "x_id": "kept?", "n": 2}',
        '{"agent": "curl", "xagent": "wget", "_rev": "1-x", "n": 3}', '{"n": 4}']) + "\n")
    (logs / "text.log").write_text(f"ok 1\n{EVIL}\nok 2\n")
    sources = [
        {"name": "j", "database": database, "format": "json", "paths": [str(logs / "app.json")]},
        {"name": "r", "database": database, "regex": r"^(?P<word>(a+)+)$|^ok (?P<n>\d)",
         "paths": [str(logs / "text.log")]},
    ]
    agent = AgentProcess(write_config(tmp_path / "etc", couchdb_url, sources))
    with agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= 8 or not agent.running(), 60, "8 documents")
        assert agent.running(), agent.log()[-3000:]
        assert agent.stop() == 0, agent.log()[-3000:]
    docs = couch.docs(database)
    stored = Counter(canonical({k: v for k, v in d.items() if k not in ("_id", "_rev", "agent")})
                     for d in docs)
    assert stored == Counter(canonical(f) for f in [
        {"n": 1}, {"message": DEEP}, {"x_id": "evil", "xx_id": "kept?", "n": 2},
        {"xagent": "curl", "xxagent": "wget", "x_rev": "1-x", "n": 3}, {"n": 4},
        {"n": "1"}, {"message": EVIL}, {"n": "2"}])
    errors = sorted(d["agent"]["parse_error"].split(":")[0] for d in docs
                    if "parse_error" in d["agent"])
    assert errors == ["JSON that cannot be stored", "line does not match the regex"]
    assert all(orjson.loads(orjson.dumps(d)) == d for d in docs)
