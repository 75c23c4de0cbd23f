"""The nginx front (issue 10): Debian's nginx on loopback ports with a throwaway CA, rendered by
`agent setup --nginx`, in front of the test backend after `agent setup`."""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.backendsetup import Account, run_agent
from tests.couch import CouchDB
from tests.front import Front, running_front
from tests.integration.harness import Pipeline
from tests.nginx import NGINX

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup "
                                 "installs Debian's nginx)")]


@pytest.fixture(scope="module")
def front(couchdb_url: str, couch: CouchDB, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    folder = tmp_path_factory.mktemp("front")
    with running_front(couchdb_url, couch, folder, f"log_front_{secrets.token_hex(4)}") as front:
        yield front


def creds(user: Account) -> tuple[str, str]:
    return user.name, user.password


def test_anonymous_post_and_bulk_docs_succeed(front: Front, couch: CouchDB) -> None:
    one = front.client.request("POST", f"/{front.db}", json.dumps({"msg": "one"}))
    assert one.status in (201, 202), one
    bulk = front.client.request("POST", f"/{front.db}/_bulk_docs", json.dumps(
        {"docs": [{"msg": "two"}, {"_id": "app.three", "msg": "three"}]}))
    assert bulk.status == 201, bulk
    assert all(row.get("ok") for row in bulk.json()), bulk.json()
    stored = {doc["_id"]: doc["msg"] for doc in couch.docs(front.db) if "msg" in doc}
    assert stored[one.json()["id"]] == "one"
    assert stored["app.three"] == "three"
    assert Counter(stored.values())["two"] == 1


@pytest.fixture(scope="module")
def stored_doc(front: Front, couch: CouchDB) -> str:
    """A document stored by the agent's user, and a view to read: what anonymous reads target."""
    status, _ = couch.request("PUT", f"/{front.db}/_design/r", {
        "views": {"v": {"map": "function (doc) { emit(doc._id, null); }"}}})
    assert status == 201
    doc_id = "app:1.2.abc:000000000000"
    answer = front.client.request("POST", f"/{front.db}", json.dumps({"_id": doc_id, "msg": "a"}),
                                  auth=creds(front.agent))
    assert answer.status in (201, 202), answer
    return doc_id


@pytest.mark.parametrize("path", ["/{db}/{doc}", "/{db}/_all_docs", "/{db}/_design/r/_view/v",
                                  "/{db}/_changes", "/{db}", "/", "/_all_dbs"])
def test_anonymous_gets_are_refused(front: Front, stored_doc: str, path: str) -> None:
    answer = front.client.request("GET", path.format(db=front.db, doc=stored_doc))
    assert answer.status == 401, answer
    assert answer.headers.get("www-authenticate") == 'Basic realm="couchlog"'


READS_AS_POST = ["/{db}/_find", "/{db}/_all_docs", "/{db}/_design/r/_view/v", "/{db}/_bulk_get",
                 "/{db}/_changes", "/{db}/_revs_diff", "/_session", "/_replicate", "/_users",
                 "/_users/_bulk_docs", "/other_{db}", "/other_{db}/_bulk_docs", "/{db}/_explain",
                 "/{db}%2F_find", "/{db}%2f_all_docs", "/{db}%2F_bulk_docs", "//{db}",
                 "//{db}/_bulk_docs", "/{db}//_bulk_docs", "/{db}/./_bulk_docs",
                 "/./{db}/_bulk_docs", "/{db}/../_users", "/{db}/_bulk_docs/../_find",
                 "/{db}/%2e%2e/_users", "/{db}/_bulk_docs/%2e%2e/_find", "/{db}?batch=ok",
                 "/{db}/_bulk_docs?x=1", "/{db}/_bulk_docs?", "/{db}/", "/{db}/_bulk_docs/",
                 "/{db}/_design/r", "/{db}/_local/x", "/{db}/_ensure_full_commit"]


@pytest.mark.parametrize("path", READS_AS_POST)
def test_anonymous_posts_other_than_writes_are_refused(front: Front, stored_doc: str, path: str) -> None:
    body = json.dumps({"keys": [stored_doc], "docs": [{"id": stored_doc}], "selector": {},
                       "name": "x", "password": "y", "source": front.db, "target": "x"})
    answer = front.client.request("POST", path.format(db=front.db), body)
    assert answer.status in (401, 403), answer
    assert stored_doc.encode() not in answer.body


@pytest.mark.parametrize("case", ["agent_id", "rev_overwrite", "revisions_overwrite", "deleted",
                                  "attachments", "design", "design_bulk", "update"])
def test_public_writes_only_create_their_own_ids(front: Front, couch: CouchDB, stored_doc: str,
                                                  case: str) -> None:
    attachment = {"a.txt": {"content_type": "text/plain",
                            "data": base64.b64encode(b"hi").decode()}}
    fresh = f"app.{case}.{secrets.token_hex(4)}"
    targets: dict[str, tuple[str, dict[str, object], str]] = {
        "agent_id": ("", {"_id": f"app:1.2.abc:{secrets.token_hex(6)}", "msg": "x"}, ""),
        "rev_overwrite": ("/_bulk_docs", {"new_edits": False, "docs": [
            {"_id": stored_doc, "_rev": "1-" + "f" * 32, "msg": "overwritten"}]}, stored_doc),
        # `_revisions` without `_rev`: CouchDB takes the revision from it.
        "revisions_overwrite": ("/_bulk_docs", {"new_edits": False, "docs": [
            {"_id": stored_doc, "_revisions": {"start": 2, "ids": ["f" * 32, "e" * 32]},
             "msg": "overwritten"}]}, stored_doc),
        "deleted": ("", {"_id": fresh, "_deleted": True}, ""),
        "attachments": ("", {"_id": fresh, "_attachments": attachment}, ""),
        "design": ("", {"_id": "_design/evil", "views": {}}, ""),
        "design_bulk": ("/_bulk_docs", {"docs": [{"_id": "_design/evil", "views": {}}]}, ""),
        "update": ("/_bulk_docs", {"docs": [{"_id": stored_doc, "msg": "overwritten"}]}, stored_doc),
    }
    suffix, payload, existing = targets[case]
    before = couch.request("GET", f"/{front.db}/{existing}?conflicts=true")[1] if existing else None
    answer = front.client.request("POST", f"/{front.db}{suffix}", json.dumps(payload))
    if 200 <= answer.status < 300:
        rows = answer.json()
        assert isinstance(rows, list), answer
        # A refused document comes back with its error (CouchDB may list nothing for a
        # `new_edits: false` write); what was stored is checked below either way.
        assert all(row.get("error") in ("forbidden", "unauthorized", "conflict")
                   for row in rows), answer
    else:
        assert answer.status in (400, 401, 403), answer
    if existing:
        after = couch.request("GET", f"/{front.db}/{existing}?conflicts=true")[1]
        assert after == before
    else:
        docs = payload.get("docs", [payload])
        assert isinstance(docs, list)
        for doc in docs:
            assert couch.request("GET", f"/{front.db}/{doc['_id']}")[0] == 404


def test_reader_get_works(front: Front, stored_doc: str) -> None:
    doc = front.client.request("GET", f"/{front.db}/{stored_doc}", auth=creds(front.reader))
    assert doc.status == 200 and doc.json()["msg"] == "a"
    rows = front.client.request("GET", f"/{front.db}/_all_docs", auth=creds(front.reader))
    assert rows.status == 200 and stored_doc in {row["id"] for row in rows.json()["rows"]}
    posted = front.client.request("POST", f"/{front.db}/_all_docs", json.dumps({"keys": [stored_doc]}),
                                  auth=creds(front.reader))
    assert posted.status == 200 and posted.json()["rows"][0]["id"] == stored_doc


def test_reader_cannot_write(front: Front) -> None:
    answer = front.client.request("POST", f"/{front.db}", json.dumps({"_id": "app.reader", "msg": "r"}),
                                  auth=creds(front.reader))
    assert answer.status in (401, 403), answer


def test_http_redirects_to_https(front: Front) -> None:
    answer = front.client.request("GET", f"/{front.db}/_all_docs?x=1", https=False,
                                  port=front.http_port)
    assert answer.status == 301
    assert answer.headers["location"].endswith(f":{front.https_port}/{front.db}/_all_docs?x=1")
    assert answer.headers["location"].startswith("https://")


def test_oversized_body_gets_413(front: Front, couch: CouchDB) -> None:
    big = json.dumps({"_id": "app.big", "msg": "x" * (2 * 1024 * 1024)})
    answer = front.client.request("POST", f"/{front.db}", big)
    assert answer.status == 413
    assert couch.request("GET", f"/{front.db}/app.big")[0] == 404


def test_dashboard_asks_for_a_login_and_serves_the_attachment(front: Front, couch: CouchDB) -> None:
    page = b"<html>couchlog dashboard</html>"
    status, current = couch.request("GET", "/couchlog_dashboard/_design/dashboard")
    doc = {"_attachments": {"index.html": {"content_type": "text/html",
                                           "data": base64.b64encode(page).decode()}}}
    if status == 200:
        doc["_rev"] = current["_rev"]
    assert couch.request("PUT", "/couchlog_dashboard/_design/dashboard", doc)[0] == 201
    anonymous = front.client.request("GET", "/dashboard/index.html")
    assert anonymous.status == 401
    assert anonymous.headers.get("www-authenticate") == 'Basic realm="couchlog"'
    read = front.client.request("GET", "/dashboard/index.html", auth=creds(front.reader))
    assert read.status == 200 and read.body == page


def test_agent_run_ships_through_the_front_over_tls(front: Front, couch: CouchDB,
                                                     couchdb_url: str, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    lines = [f"line {i} from the agent" for i in range(300)] + ["line 0 from the agent"]
    pipeline = Pipeline(tmp_path, couch, f"https://127.0.0.1:{front.https_port}", front.db,
                        [{"name": "tls", "paths": [str(log)]}],
                        couchdb={"ca_file": str(front.ca), "username": front.agent.name,
                                 "password": front.agent.password})
    before = Counter(str(doc["msg"]) for doc in couch.docs(front.db) if "msg" in doc)
    log.write_text("".join(line + "\n" for line in lines))
    pipeline.start()
    try:
        expected = before + Counter(lines)
        pipeline.wait_for(expected)
    finally:
        pipeline.stop()


def send_through(front: Front, data: Path) -> subprocess.CompletedProcess[str]:
    """`agent send` of a file through the front over TLS, anonymously."""
    return run_agent("send", "--url", f"https://127.0.0.1:{front.https_port}", "--ca-file",
                     str(front.ca), "--db", front.db, str(data))


def messages(couch: CouchDB, db: str, prefix: str) -> Counter[str]:
    """The `msg` of every document in `db` that starts with `prefix`."""
    return Counter(str(doc["msg"]) for doc in couch.docs(db)
                   if str(doc.get("msg", "")).startswith(prefix))


def test_agent_send_through_the_front_anonymously_stores_once(front: Front, couch: CouchDB,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "app.jsonl"
    data.write_text("".join(json.dumps({"msg": f"sent {i}"}) + "\n" for i in range(50)))
    first = send_through(front, data)
    assert first.returncode == 0, first.stderr
    second = send_through(front, data)
    assert second.returncode == 0 and "0 stored, 50 already stored" in second.stderr, second.stderr
    assert messages(couch, front.db, "sent ") == Counter(f"sent {i}" for i in range(50))


@pytest.mark.parametrize("authorization", ["x", "Bearer x", "Digest username=\"x\"", "Basic",
                                           "Basic !!", "Basic " + "A" * 4 + " extra"])
@pytest.mark.parametrize("path", ["/{db}/_find", "/{db}/_bulk_get", "/{db}/_all_docs"])
def test_a_request_with_other_than_basic_credentials_cannot_read(front: Front, stored_doc: str,
                                                                 authorization: str,
                                                                 path: str) -> None:
    # Such a request reaches CouchDB as anonymous; pouchdb-server then answers `_find` and
    # `_bulk_get` with the documents.
    body = json.dumps({"selector": {}, "docs": [{"id": stored_doc}], "keys": [stored_doc]})
    answer = front.client.request("POST", path.format(db=front.db), body,
                                  headers={"Authorization": authorization})
    assert answer.status in (401, 403), answer
    assert stored_doc.encode() not in answer.body


def test_a_compressed_anonymous_write_cannot_pass_the_size_cap(front: Front, couch: CouchDB) -> None:
    # 2 MiB of JSON in a few KiB of gzip, against the front's 1m cap: CouchDB would inflate it.
    doc_id = f"app.gzip.{secrets.token_hex(4)}"
    big = gzip.compress(json.dumps({"_id": doc_id, "msg": "x" * (2 * 1024 * 1024)}).encode())
    assert len(big) < 64 * 1024
    for suffix, body in (("", big), ("/_bulk_docs", gzip.compress(json.dumps(
            {"docs": [{"_id": doc_id, "msg": "x" * (2 * 1024 * 1024)}]}).encode()))):
        answer = front.client.request("POST", f"/{front.db}{suffix}", body,
                                      headers={"Content-Encoding": "gzip"})
        assert not 200 <= answer.status < 300, answer
    assert couch.request("GET", f"/{front.db}/{doc_id}")[0] == 404
    # Uncompressed, the same front still takes a small anonymous write.
    small = front.client.request("POST", f"/{front.db}", json.dumps({"_id": doc_id, "msg": "s"}))
    assert small.status in (201, 202), small


@pytest.mark.parametrize("doc_id", [12, {"a": 1}, ["app.x"], True])
def test_a_public_write_with_an_id_that_is_no_string_is_refused_cleanly(front: Front,
                                                                         doc_id: object) -> None:
    for suffix, payload in (("", {"_id": doc_id, "msg": "x"}),
                            ("/_bulk_docs", {"docs": [{"_id": doc_id, "msg": "x"}]})):
        answer = front.client.request("POST", f"/{front.db}{suffix}", json.dumps(payload))
        if answer.status == 201 and suffix:
            assert all(row.get("error") for row in answer.json()), answer
        else:
            assert answer.status in (400, 403), answer
        assert b"TypeError" not in answer.body and b"node_modules" not in answer.body, answer


def raw_request(front: Front, head: str, body: bytes = b"") -> bytes:
    """One request written to the TLS socket exactly as given (absolute-form targets, doubled
    headers, conflicting framing), and the whole answer."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(front.ca))
    with socket.create_connection(("127.0.0.1", front.https_port), timeout=30) as plain, \
            context.wrap_socket(plain, server_hostname="localhost") as tls:
        tls.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("trick", [
    "POST http://localhost/{db}/_find HTTP/1.1", "POST https://x/{db}/_all_docs HTTP/1.1",
    "POST /{db}/_find HTTP/1.0", "GET /{db}/_all_docs HTTP/1.0",
    *(f"{m} /{{db}}/_bulk_docs HTTP/1.1" for m in ("HEAD", "OPTIONS", "PUT", "DELETE", "COPY",
                                                    "PATCH", "post", "TRACE")),
    *(f"{m} /{{db}}/{{doc}} HTTP/1.1" for m in ("PUT", "DELETE", "COPY", "PATCH")),
    "POST /{db};x HTTP/1.1", "POST /{db}%00 HTTP/1.1", "POST /{db}/..%2f_users HTTP/1.1",
    "POST /{db}/_bulk_docs/ HTTP/1.1", "POST /{db}\u00e9 HTTP/1.1", "POST /" + "l" * 9000 + " HTTP/1.1",
    "POST /{db}/_find HTTP/1.1\nAuthorization:\nAuthorization: Basic eDp5",
    "POST /{db}/_find HTTP/1.1\nHost: other", "POST /{db}/_find HTTP/1.1\nX-HTTP-Method-Override: POST",
    "POST /{db} HTTP/1.1\nX-HTTP-Method-Override: GET",
    "POST /{db} HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 3",
])
def test_parsing_tricks_neither_read_nor_show_the_writer_login(front: Front, stored_doc: str,
                                                              trick: str) -> None:
    body = json.dumps({"selector": {}, "keys": [stored_doc], "docs": [{"id": stored_doc}],
                       "_id": stored_doc, "msg": "overwritten"}).encode()
    framing = f"Content-Length: {len(body)}\n" if "Transfer-Encoding" not in trick else ""
    head = (trick.format(db=front.db, doc=quote(stored_doc, safe="")) + "\nHost: localhost\n"
            "Connection: close\nContent-Type: application/json\n" + framing + "\n")
    # With "Host: other" the request has two Host headers.
    answer = raw_request(front, head, b"10\r\n" + body[:16] + b"\r\n0\r\n\r\n"
                         if "chunked" in trick else body)
    assert not 200 <= int(answer.split(b" ", 2)[1]) < 300, answer[:400]
    assert stored_doc.encode() not in answer, answer[:400]
    token = base64.b64encode(f"{front.public.name}:{front.public.password}".encode())
    assert token not in answer and front.public.password.encode() not in answer


def test_agent_send_splits_a_batch_too_big_for_the_front(front: Front, couch: CouchDB,
                                                         tmp_path: Path) -> None:
    # Three lines of 400 kB in one batch pass the front's 1m cap only a part at a time; the
    # batch was refused with 413 on every run.
    lines = [{"msg": f"big {i}", "pad": str(i) * 400_000} for i in range(3)]
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = send_through(front, data)
    assert done.returncode == 0, done.stderr
    assert "3 stored" in done.stderr, done.stderr
    assert messages(couch, front.db, "big ") == Counter(f"big {i}" for i in range(3))


def test_agent_send_refuses_only_the_line_too_big_for_the_front(front: Front, couch: CouchDB,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "one-huge.jsonl"
    data.write_text(json.dumps({"msg": "small 1"}) + "\n" + json.dumps({"msg": "x" * 1_500_000})
                    + "\n" + json.dumps({"msg": "small 2"}) + "\n")
    done = send_through(front, data)
    assert done.returncode == 4, done.stderr
    assert "2 stored, 0 already stored, 1 refused" in done.stderr, done.stderr
    assert messages(couch, front.db, "small ") == Counter(["small 1", "small 2"])
