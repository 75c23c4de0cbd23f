"""What each `_bulk_docs` per-document result means (pure), and credentials kept out of URLs."""

from __future__ import annotations

from agent.config import CouchDBConfig
from agent.shipper import basic_auth, bulk_body, classify_results, endpoints
from agent.types import Document, FileId, SourceFile

F = SourceFile("s", FileId(1, 1, "ff"))


def doc(n: int) -> Document:
    return Document(f"d{n}", b'{"_id":"d%d"}' % n, F, n * 10)


def test_ok_and_conflict_are_delivered_others_are_not() -> None:
    docs = [doc(i) for i in range(6)]
    results = [
        {"ok": True, "id": "d0", "rev": "1-a"},
        {"id": "d1", "error": "conflict", "reason": "Document update conflict"},
        {"id": "d2", "error": "forbidden", "reason": "no"},
        {"id": "d3", "error": "unauthorized", "reason": "no"},
        {"id": "d4", "error": "internal_server_error", "reason": "?"},
    ]
    outcome = classify_results(docs, results)
    assert [d.doc_id for d in outcome.stored] == ["d0"]
    assert [d.doc_id for d in outcome.conflicts] == ["d1"]
    assert [(r.doc.doc_id, r.error) for r in outcome.rejected] == [("d2", "forbidden"),
                                                                    ("d3", "unauthorized")]
    assert [d.doc_id for d in outcome.retry] == ["d4", "d5"]


def test_results_are_matched_by_id_not_position() -> None:
    outcome = classify_results([doc(1), doc(2)], [{"id": "d2", "ok": True}, {"id": "d1", "ok": True}])
    assert [d.doc_id for d in outcome.stored] == ["d1", "d2"]


def test_a_body_that_is_not_a_result_list_retries_everything() -> None:
    for body in (None, {"error": "x"}, [1, "a"]):
        assert len(classify_results([doc(1)], body).retry) == 1


def test_bulk_body_is_valid_json() -> None:
    assert bulk_body([doc(1), doc(2)]) == b'{"docs":[{"_id":"d1"},{"_id":"d2"}]}'


def test_credentials_are_split_off_the_url() -> None:
    (target,) = endpoints(CouchDBConfig(("http://admin:p%40ss@127.0.0.1:5984",), None, None, 5))
    assert target.url == "http://127.0.0.1:5984"
    assert target.headers == basic_auth("admin", "p@ss")
    assert basic_auth("admin", "p@ss") == {"Authorization": "Basic YWRtaW46cEBzcw=="}
    (plain,) = endpoints(CouchDBConfig(("https://db.example",), "w", "p", 5))
    assert plain.url == "https://db.example" and plain.headers == basic_auth("w", "p")
    (anonymous,) = endpoints(CouchDBConfig(("http://[::1]:5984/couch",), None, None, 5))
    assert anonymous.url == "http://[::1]:5984/couch" and anonymous.headers == {}
