"""Every custom reduce shipped in agent/reports/ gives under CouchDB's rereduce what it gives in
one pass. pouchdb-server never calls rereduce, so tests/node/rereduce.js does it as CouchDB does."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.report import design_documents

HARNESS = Path(__file__).resolve().parent / "rereduce.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def fail2ban_docs(count: int, seed: int = 5) -> list[dict[str, Any]]:
    """Documents as the agent makes them from the seed's fail2ban bans, repeat offenders included,
    and a few shipped raw (no ip), as a parse error leaves them."""
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        if rng.random() < 0.05:
            docs.append({"_id": f"d{n:06d}", "message": "fail2ban.actions[1]: NOTICE [sshd] Ban x",
                         "machine": "server", "agent": {"parse_error": "no match"}})
            continue
        ip = f"203.0.113.{rng.randint(1, 12)}" if rng.random() < 0.5 else \
            f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.0.{rng.randint(1, 254)}"
        docs.append({"_id": f"d{n:06d}", "date": f"2017-06-{rng.randint(10, 20)}",
                     "hour": "10:00:00,000", "process": rng.choice(["sshd", "postfix"]), "ip": ip,
                     "machine": rng.choice(["server", "web"])})
    return docs


def run_harness(designs: dict[str, Any], docs: list[dict[str, Any]], splits: int = 25) -> Any:
    assert NODE is not None
    done = subprocess.run([NODE, str(HARNESS)], input=json.dumps(
        {"designs": designs, "docs": docs, "splits": splits, "seed": 11}),
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_shipped_custom_reduce_equals_one_pass_under_rereduce() -> None:
    designs = design_documents()
    result = run_harness(designs, fail2ban_docs(3000))
    custom = {(doc_id, name) for doc_id, doc in designs.items()
              for name, view in doc["views"].items()
              if "reduce" in view and not view["reduce"].startswith("_")}
    assert custom == {("_design/report", "attacks_per_ip"), ("_design/report", "ip_counts")}
    assert {(c["design"], c["view"]) for c in result["checked"]} == custom
    # Group level 0 reduces all 3000 rows into one value through many rereduce passes.
    assert any(c["group_level"] == 0 and c["rows"] == 3000 for c in result["checked"])
    assert result["mismatches"] == []


def test_harness_catches_a_reduce_without_a_rereduce_branch() -> None:
    # A counting reduce that forgets rereduce counts partial results instead of adding them:
    # right in one pass (and on pouchdb-server), wrong on CouchDB. The harness must say so.
    wrong = {"_design/wrong": {"views": {"count": {
        "map": "function(doc) { emit([doc.ip], 1) }",
        "reduce": "function(keys, values, rereduce) { return values.length; }"}}}}
    result = run_harness(wrong, fail2ban_docs(500))
    assert result["mismatches"], "a reduce without rereduce passed the harness"
    assert {m["group_level"] for m in result["mismatches"]} >= {0}
