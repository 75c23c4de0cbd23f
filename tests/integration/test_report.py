"""The shipped reports over a known fail2ban set loaded by the real `agent run`: exact numbers from
`agent report`, checked against counts computed here from the lines written.

The seed's `attacks` view keys on `new Date(doc.date)` read in the JS engine's local time; the
counts below assume the server runs in UTC (pouchdb-server started by the suite does, on these
machines, and so does CouchDB's official image).
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml

from agent.report import design_documents
from bench import fail2ban_log
from bench.fail2ban_log import SEED_SCHEMA
from tests.agentproc import AgentProcess, wait_for, write_config
from tests.couch import CouchDB

pytestmark = pytest.mark.integration

DAYS = ("2017-05-31", "2017-06-01", "2017-06-11", "2017-06-12", "2017-07-01")
LINES = 1400
READER, READER_PASSWORD = "report_reader", "reader-secret-1"


class Expected:
    """What the reports must say, computed from the lines alone (not from the database)."""

    def __init__(self, lines: list[str]) -> None:
        kept = [t for t in lines if fail2ban_log.seed_keeps(t)]
        parsed = [t.split() for t in kept if len(t.split()) == 8]
        self.kept = len(kept)
        self.errors = self.kept - len(parsed)
        # [machine, year, month counted from 0, day], as the seed's view keys it.
        self.by_day = Counter(("server", int(p[0][:4]), int(p[0][5:7]) - 1, int(p[0][8:10]))
                              for p in parsed)
        self.by_date = Counter(p[0] for p in parsed)
        self.ips = Counter(p[7] for p in parsed)
        self.processes = Counter(p[5].strip("[]") for p in parsed)


def known_lines(count: int) -> list[str]:
    """The fail2ban generator's lines, re-dated over DAYS so the per-day counts differ."""
    rng = random.Random(23)
    out = []
    for index in range(count):
        text = fail2ban_log.line(rng, index)
        out.append(DAYS[rng.randrange(len(DAYS))] + text[10:])
    return out


@pytest.fixture(scope="module")
def loaded(couch: CouchDB, couchdb_url: str, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[str, Expected, Path, str]]:
    """A database holding the known set, shipped by `agent run`, readable by a reader user;
    yields (database, expected counts, a folder with the password files, the server URL)."""
    root = tmp_path_factory.mktemp("report")
    database = f"log_report_{uuid.uuid4().hex[:10]}"
    couch.create_db(database)
    lines = known_lines(LINES)
    log = root / "fail2ban.log"
    log.write_text("".join(t + "\n" for t in lines))
    expected = Expected(lines)
    source = {"name": "fail2ban", "database": database, "paths": [str(log)],
              "include": ["NOTICE", "Ban"], "schema": SEED_SCHEMA, "fields": {"machine": "server"}}
    config = write_config(root / "etc", couchdb_url, [source])
    with AgentProcess(config) as agent:
        agent.wait_started()
        wait_for(lambda: couch.count(database) >= expected.kept, 90, f"{expected.kept} documents")
        assert agent.stop() == 0
    assert couch.count(database) == expected.kept
    _allow_object_reduces(couch)
    status, body = couch.request("PUT", f"/_users/org.couchdb.user:{READER}", {
        "_id": f"org.couchdb.user:{READER}", "name": READER, "password": READER_PASSWORD,
        "roles": ["couchlog_reader"], "type": "user"})
    assert status in (201, 202, 409), (status, body)
    status, body = couch.request("PUT", f"/{database}/_security", {
        "admins": {"names": [], "roles": []}, "members": {"names": [], "roles": ["couchlog_reader"]}})
    assert status in (200, 201), (status, body)
    (root / "reader").write_text(READER_PASSWORD + "\n")
    (root / "admin").write_text((urlsplit(couchdb_url).password or "") + "\n")
    yield database, expected, root, couchdb_url
    couch.delete_db(database)


def _allow_object_reduces(couch: CouchDB) -> None:
    """On a real CouchDB the seed's per-IP reduce needs reduce_limit = false, which `agent setup`
    sets; pouchdb-server has no such limit (and no node config API)."""
    status, nodes = couch.request("GET", "/_membership")
    if status != 200:
        return
    for node in nodes.get("cluster_nodes", []):
        couch.request("PUT", f"/_node/{quote(node, safe='')}/_config/query_server_config/"
                      "reduce_limit", "false")


def agent_report(loaded: tuple[str, Expected, Path, str], *args: str, admin: bool = False,
                 ) -> subprocess.CompletedProcess[str]:
    database, _, root, url = loaded
    parts = urlsplit(url)
    user = (parts.username or "admin") if admin else READER
    done = subprocess.run(
        [sys.executable, "-m", "agent", "report", *args, "--url",
         f"{parts.scheme}://{parts.hostname}:{parts.port}", "--db", database, "--user", user,
         "--password-file", str(root / ("admin" if admin else "reader"))],
        capture_output=True, text=True, timeout=120, check=False)
    return done


def rows(loaded: tuple[str, Expected, Path, str], *args: str) -> list[dict[str, Any]]:
    done = agent_report(loaded, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def installed(loaded: tuple[str, Expected, Path, str]) -> tuple[str, Expected, Path, str]:
    done = agent_report(loaded, "--install", admin=True)
    assert done.returncode == 0, done.stderr
    return loaded


def test_install_writes_the_seed_design_byte_for_byte_and_rewrites_nothing_unchanged(
        couch: CouchDB, installed: tuple[str, Expected, Path, str]) -> None:
    database = installed[0]
    status, doc = couch.request("GET", f"/{database}/_design/report")
    assert status == 200
    assert doc["views"]["attacks"] == {
        "map": "function(doc) { var date = new Date(doc.date); emit([doc.machine, "
               "date.getFullYear(), date.getMonth(), date.getDate()], 1) }", "reduce": "_count"}
    assert doc["views"]["attackers"] == {
        "map": "function(doc) { emit(doc.date, [doc.ip, doc.process]) }"}
    revs = {d: couch.request("GET", f"/{database}/{d}")[1]["_rev"] for d in design_documents()}
    again = agent_report(installed, "--install", admin=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": unchanged") == len(design_documents()), again.stdout
    assert {d: couch.request("GET", f"/{database}/{d}")[1]["_rev"] for d in revs} == revs
    # A changed report is put back; a reader may not do it (design documents need an admin).
    doc["views"]["attackers"]["map"] = "function(doc) { emit(null, 1) }"
    assert couch.request("PUT", f"/{database}/_design/report", doc)[0] in (201, 202)
    refused = agent_report(installed, "--install")
    assert refused.returncode == 1 and "admin" in refused.stderr, refused
    fixed = agent_report(installed, "--install", admin=True)
    assert "_design/report: updated" in fixed.stdout and "couchlog: unchanged" in fixed.stdout
    assert couch.request("GET", f"/{database}/_design/report")[1]["views"] == \
        design_documents()["_design/report"]["views"]


def test_attacks_at_group_levels_1_and_4(installed: tuple[str, Expected, Path, str]) -> None:
    expected = installed[1]
    assert rows(installed, "attacks", "--group-level", "1") == [
        {"key": ["server"], "value": expected.kept}]
    by_day = {tuple(r["key"]): r["value"] for r in rows(installed, "attacks", "--group-level", "4")}
    # Lines that did not parse have no date: the seed's view keys them [machine, null, null, null].
    assert by_day == {**expected.by_day, ("server", None, None, None): expected.errors}
    assert by_day[("server", 2017, 6, 1)] == expected.by_date["2017-07-01"]  # months count from 0
    assert rows(installed, "attacks", "--by", "machine") == [
        {"key": ["server"], "value": expected.kept}]


def test_the_seed_per_ip_reduces(installed: tuple[str, Expected, Path, str]) -> None:
    expected = installed[1]
    (row,) = rows(installed, "ip_counts")
    assert row["value"] == {**expected.ips, "null": expected.errors}
    per_ip = {r["key"][0]: r["value"] for r in rows(installed, "attacks_per_ip")}
    assert per_ip == {**expected.ips, None: expected.errors}
    top = rows(installed, "attacks_per_ip", "--top", "3")
    assert [r["value"] for r in top] == sorted(per_ip.values(), reverse=True)[:3]


def test_generic_reports(installed: tuple[str, Expected, Path, str]) -> None:
    expected = installed[1]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    per_day = rows(installed, "docs_per_day")
    assert sum(r["value"] for r in per_day) == expected.kept
    assert {r["key"][1] for r in per_day} == {"fail2ban"}
    assert all(r["key"][0] <= today for r in per_day)
    per_hour = rows(installed, "docs_per_hour", "--by", "hour")
    assert sum(r["value"] for r in per_hour) == expected.kept
    assert all(len(r["key"]) == 1 and len(r["key"][0]) == 13 for r in per_hour)
    errors = rows(installed, "parse_errors", "--group-level", "0")
    assert errors == [{"key": None, "value": expected.errors}]
    processes = rows(installed, "top_values", "--field", "process")
    assert {r["key"][1]: r["value"] for r in processes} == dict(expected.processes)
    assert [r["value"] for r in processes] == sorted(expected.processes.values(), reverse=True)
    top_ips = rows(installed, "top_values", "--field", "ip", "--top", "5")
    assert [r["value"] for r in top_ips] == sorted(expected.ips.values(), reverse=True)[:5]
    assert all(expected.ips[r["key"][1]] == r["value"] for r in top_ips)
    machines = rows(installed, "top_values", "--field", "machine")
    assert machines == [{"key": ["machine", "server"], "value": expected.kept}]


def test_since_and_until(installed: tuple[str, Expected, Path, str]) -> None:
    expected = installed[1]
    window = rows(installed, "attacks", "--group-level", "4", "--since", "2017-06-01",
                  "--until", "2017-06-11")
    assert {tuple(r["key"]): r["value"] for r in window} == {
        ("server", 2017, 5, 1): expected.by_date["2017-06-01"],
        ("server", 2017, 5, 11): expected.by_date["2017-06-11"]}
    total = rows(installed, "attacks", "--group-level", "1", "--since", "2017-06-11")
    assert total == [{"key": ["server"], "value": sum(
        n for d, n in expected.by_date.items() if d >= "2017-06-11")}]
    early = rows(installed, "attackers", "--until", "2017-06-01")
    assert Counter(r["key"] for r in early) == {
        d: n for d, n in expected.by_date.items() if d <= "2017-06-01"}
    none = rows(installed, "docs_per_day", "--until", "2017-01-01")
    assert none == []
    refused = agent_report(installed, "attacks_per_ip", "--since", "2017-06-01")
    assert refused.returncode == 2 and "no time" in refused.stderr


def test_csv_table_and_stale(installed: tuple[str, Expected, Path, str]) -> None:
    expected = installed[1]
    done = agent_report(installed, "attacks", "--group-level", "4", "--format", "csv")
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout)))
    assert table[0] == ["machine", "year", "month0", "day", "value"]
    assert {tuple(r[:4]): int(r[4]) for r in table[1:]} == {
        **{(m, str(y), str(mo), str(d)): n for (m, y, mo, d), n in expected.by_day.items()},
        ("server", "null", "null", "null"): expected.errors}
    done = agent_report(installed, "ip_counts", "--format", "csv", "--top", "2")
    lines = list(csv.reader(io.StringIO(done.stdout)))
    assert lines[0] == ["ip", "value"]
    assert [int(v) for _, v in lines[1:]] == sorted([*expected.ips.values(), expected.errors],
                                                     reverse=True)[:2]
    done = agent_report(installed, "attacks", "--by", "day", "--format", "table", "--stale", "ok")
    assert done.returncode == 0, done.stderr
    assert "--stale ok" in done.stderr
    header, *body = done.stdout.splitlines()
    assert header.split() == ["machine", "year", "month0", "day", "value"]
    assert len(body) == len(expected.by_day) + 1 and all("█" in line for line in body)
    assert "\x1b[" not in done.stdout  # no colour when stdout is not a terminal
    listing = agent_report(installed, "--list")
    assert listing.returncode == 0
    assert sum("installed" in line for line in listing.stdout.splitlines()) == sum(
        len(d["views"]) for d in design_documents().values())


def test_server_and_database_from_the_config(installed: tuple[str, Expected, Path, str]) -> None:
    # -c gives the URL (here with the admin's credentials in it) and the sources' one database;
    # --user and --password-file still decide who asks.
    database, expected, root, _ = installed
    done = subprocess.run(
        [sys.executable, "-m", "agent", "report", "attacks", "--group-level", "1", "--format",
         "json", "-c", str(root / "etc" / "agent.yaml"), "--user", READER, "--password-file",
         str(root / "reader")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"key": ["server"], "value": expected.kept}]
    wrong = root / "wrong"
    wrong.write_text("not-the-password\n")
    refused = subprocess.run(
        [sys.executable, "-m", "agent", "report", "attacks", "-c", str(root / "etc" / "agent.yaml"),
         "--user", READER, "--password-file", str(wrong)],
        capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "401" in refused.stderr and "not-the-password" not in \
        refused.stderr + refused.stdout
    assert database in (root / "etc" / "conf.d" / "fail2ban.yaml").read_text()
    # The config's reader.* keys name who asks when --user is not given.
    main = root / "etc" / "agent.yaml"
    settings = yaml.safe_load(main.read_text())
    main.write_text(yaml.safe_dump({**settings, "reader": {"username": READER,
                                                            "password_file": str(root / "reader")}}))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "report", "attacks", "--group-level", "1", "--format",
             "json", "-c", str(main)], capture_output=True, text=True, timeout=120, check=False)
        main.write_text(yaml.safe_dump({**settings, "reader": {"username": READER,
                                                                "password_file": str(wrong)}}))
        refused = subprocess.run(
            [sys.executable, "-m", "agent", "report", "attacks", "-c", str(main)],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        main.write_text(yaml.safe_dump(settings))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"key": ["server"], "value": expected.kept}]
    assert refused.returncode == 1 and "401" in refused.stderr
