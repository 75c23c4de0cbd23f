"""`agent send`: a file is stored once however often it is sent; exit codes say what failed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.agentproc import write_config
from tests.backendsetup import run_agent
from tests.couch import CouchDB

pytestmark = pytest.mark.integration


def stored(couch: CouchDB, db: str) -> Counter[str]:
    return Counter(json.dumps({k: v for k, v in doc.items() if not k.startswith("_") and k != "agent"},
                              sort_keys=True) for doc in couch.docs(db))


def expected(lines: list[dict[str, object]]) -> Counter[str]:
    return Counter(json.dumps(line, sort_keys=True) for line in lines)


def test_send_stores_a_file_once_even_when_run_twice(couchdb_url: str, couch: CouchDB,
                                                     database: str, tmp_path: Path) -> None:
    lines = [{"n": i, "msg": f"event {i % 7}"} for i in range(1200)] + [{"n": 1, "msg": "event 1"}]
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first = run_agent("send", "--url", couchdb_url, "--db", database, "--batch-size", "500", str(data))
    assert first.returncode == 0, first.stderr
    assert "1201 stored, 0 already stored" in first.stderr
    assert stored(couch, database) == expected(lines)
    second = run_agent("send", "--url", couchdb_url, "--db", database, str(data))
    assert second.returncode == 0, second.stderr
    assert "0 stored, 1201 already stored" in second.stderr
    assert stored(couch, database) == expected(lines)
    # The file grew: only the new lines are stored.
    more = [{"n": "late", "msg": "appended"}]
    with data.open("a") as out:
        out.write(json.dumps(more[0]) + "\n")
    third = run_agent("send", "--url", couchdb_url, "--db", database, str(data))
    assert third.returncode == 0, third.stderr
    assert "1 stored, 1201 already stored" in third.stderr
    assert stored(couch, database) == expected(lines + more)
    # From stdin under the file's name, the same lines are the same documents.
    fourth = run_agent("send", "--url", couchdb_url, "--db", database, "--name", str(data), "-",
                       stdin=data.read_bytes())
    assert fourth.returncode == 0, fourth.stderr
    assert "0 stored, 1202 already stored" in fourth.stderr
    assert stored(couch, database) == expected(lines + more)
    assert couchdb_url.split("@")[0].split(":")[-1] not in first.stderr + first.stdout


def test_different_files_with_the_same_lines_are_both_stored(couchdb_url: str, couch: CouchDB,
                                                             database: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"msg": "same"}\n{"msg": "only a"}\n')
    b.write_text('{"msg": "same"}\n{"msg": "only b"}\n')
    done = run_agent("send", "--url", couchdb_url, "--db", database, str(a), str(b))
    assert done.returncode == 0, done.stderr
    assert stored(couch, database) == expected(
        [{"msg": "same"}, {"msg": "only a"}, {"msg": "same"}, {"msg": "only b"}])


def test_send_with_a_source_parser_and_bad_lines_as_data(couchdb_url: str, couch: CouchDB,
                                                          database: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "etc", couchdb_url, [
        {"name": "web", "paths": [str(tmp_path / "x.log")], "database": database,
         "schema": "$ip $verb $path", "fields": {"machine": "web1"}}])
    log = tmp_path / "access.log"
    log.write_bytes(b"10.0.0.1 GET /a\n10.0.0.2 POST /b\nunparseable\n\n10.0.0.3 GET /c\n")
    done = run_agent("send", "-c", str(config), "--source", "web", str(log))
    assert done.returncode == 0, done.stderr
    docs = couch.docs(database)
    parsed = Counter((d.get("ip"), d.get("verb"), d.get("path"), d["machine"]) for d in docs
                     if "ip" in d)
    assert parsed == Counter([("10.0.0.1", "GET", "/a", "web1"), ("10.0.0.2", "POST", "/b", "web1"),
                              ("10.0.0.3", "GET", "/c", "web1")])
    raw = [d for d in docs if "ip" not in d]
    assert len(raw) == 1 and raw[0]["agent"]["parse_error"]
    again = run_agent("send", "-c", str(config), "--source", "web", str(log))
    assert again.returncode == 0 and "0 stored, 4 already stored" in again.stderr, again.stderr
    assert len(couch.docs(database)) == 4


def test_exit_codes_say_what_failed(couchdb_url: str, couch: CouchDB, database: str,
                                    tmp_path: Path) -> None:
    data = tmp_path / "one.jsonl"
    data.write_text('{"msg": "x"}\n')
    parts = urlsplit(couchdb_url)
    missing_db = run_agent("send", "--url", couchdb_url, "--db", "log_never_created_here", str(data))
    assert missing_db.returncode == 5, missing_db.stderr
    assert "agent setup" in missing_db.stderr
    assert couch.request("GET", "/log_never_created_here")[0] == 404
    wrong_password = f"{parts.scheme}://{parts.username}:wrong@{parts.hostname}:{parts.port}"
    refused = run_agent("send", "--url", wrong_password, "--db", database, str(data))
    assert refused.returncode == 4, refused.stderr
    unreadable = run_agent("send", "--url", couchdb_url, "--db", database, str(tmp_path / "nope"))
    assert unreadable.returncode == 3, unreadable.stderr
    down = run_agent("send", "--url", "http://127.0.0.1:9", "--db", database, "--retries", "1",
                     str(data))
    assert down.returncode == 1, down.stderr
    assert "1 not sent" in down.stderr
    usage = run_agent("send", "--url", couchdb_url, str(data))
    assert usage.returncode == 2
    assert couch.count(database) == 0


def test_the_same_line_piped_in_on_two_runs_is_stored_twice(couchdb_url: str, couch: CouchDB,
                                                             database: str) -> None:
    # A daily `echo '{"msg":"backup ok"}' | agent send -`: the second day's line is a new event.
    line = {"msg": "backup ok"}
    for run in (1, 2):
        done = run_agent("send", "--url", couchdb_url, "--db", database, "-",
                         stdin=(json.dumps(line) + "\n").encode())
        assert done.returncode == 0, done.stderr
        assert "1 stored, 0 already stored" in done.stderr, (run, done.stderr)
    assert stored(couch, database) == expected([line, line])


def test_a_file_caught_mid_line_is_not_stored_twice(couchdb_url: str, couch: CouchDB,
                                                    database: str, tmp_path: Path) -> None:
    # A buffered writer flushes mid-line: sent now and again once finished, the line was stored
    # twice, broken and whole.
    data = tmp_path / "growing.jsonl"
    data.write_bytes(b'{"msg": "a"}\n{"msg": "ha')
    first = run_agent("send", "--url", couchdb_url, "--db", database, str(data))
    assert first.returncode == 0, first.stderr
    assert "1 stored" in first.stderr and "its last line has no newline yet" in first.stderr
    with data.open("ab") as out:
        out.write(b'lf"}\n')
    second = run_agent("send", "--url", couchdb_url, "--db", database, str(data))
    assert second.returncode == 0, second.stderr
    assert "1 stored, 1 already stored" in second.stderr
    assert stored(couch, database) == expected([{"msg": "a"}, {"msg": "half"}])
    # From a pipe the input has ended: its last line is sent without a newline.
    piped = run_agent("send", "--url", couchdb_url, "--db", database, "-", stdin=b'{"msg": "end"}')
    assert piped.returncode == 0 and "1 stored" in piped.stderr, piped.stderr
    assert stored(couch, database) == expected([{"msg": "a"}, {"msg": "half"}, {"msg": "end"}])
