"""What `_bulk_docs` answers mean (pure), retries bounded, and credentials kept out of URLs."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from agent.bulk import Answer, RetryBudget, Verdict, bulk_body, classify_results, verdict
from agent.config import CouchDBConfig
from agent.couchdb import basic_auth, connection_limit, endpoints, ssl_context
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


def test_only_a_couchdb_error_body_splits_a_refused_batch() -> None:
    def verdict_of(status: int, body: bytes) -> Verdict:
        return verdict(Answer.of(status, body))

    couch = b'{"error":"bad_request","reason":"Document must be a JSON object"}'
    html = b"<html><body><h1>400 Bad Request</h1>nginx</body></html>"
    assert verdict_of(400, couch) is Verdict.SPLIT
    assert verdict_of(413, b'{"error":"too_large","reason":"the request entity is too large"}') \
        is Verdict.SPLIT
    for status in (400, 413):
        assert verdict_of(status, html) is Verdict.FAILED
        assert verdict_of(status, b"") is Verdict.FAILED
        assert verdict_of(status, b'["error"]') is Verdict.FAILED
    assert verdict_of(201, b"[]") is Verdict.RESULTS and verdict_of(202, b"[]") is Verdict.RESULTS
    assert verdict_of(201, html) is Verdict.FAILED and verdict_of(201, b"{\"ok\":true}") is Verdict.FAILED
    assert verdict_of(401, b"") is Verdict.REFUSED and verdict_of(403, b"") is Verdict.REFUSED
    assert verdict_of(404, couch) is Verdict.MISSING
    assert verdict_of(500, couch) is Verdict.FAILED and verdict_of(502, html) is Verdict.FAILED


def test_per_document_errors_are_retried_a_bounded_number_of_times() -> None:
    budget = RetryBudget(attempts=3)
    docs = [doc(1), doc(2)]
    results = [{"id": "d1", "error": "unknown_error", "reason": "boom"}]
    for attempt in (1, 2):
        outcome = classify_results(docs, results)
        assert budget.charge(outcome) == []
        assert outcome.retry == docs and len(budget) == 2 and budget.most(docs) == attempt
    outcome = classify_results(docs, results)
    given_up = budget.charge(outcome)
    assert outcome.retry == [] and len(budget) == 0
    assert [(r.doc.doc_id, r.error) for r in given_up] == [("d1", "unknown_error"),
                                                           ("d2", "no_result")]
    assert given_up[0].reason.startswith("boom")


def test_a_stored_document_leaves_the_retry_budget() -> None:
    budget = RetryBudget(attempts=2)
    budget.charge(classify_results([doc(1)], []))
    outcome = classify_results([doc(1)], [{"id": "d1", "ok": True}])
    budget.settled(outcome.stored)
    assert len(budget) == 0
    assert budget.charge(classify_results([doc(1)], [])) == []


def test_the_connection_pool_covers_every_send_in_flight_and_the_probes() -> None:
    assert connection_limit(concurrency=4, databases=3) >= 4 * 3 + 3
    assert connection_limit(concurrency=1, databases=1) >= 2


def test_tls_settings_are_optional_and_build_a_context() -> None:
    plain = CouchDBConfig(("https://db.example",), None, None, 5)
    assert ssl_context(plain) is None

    @dataclass(frozen=True)
    class WithTLS(CouchDBConfig):
        ca_file: str | None = None
        tls_verify: bool = True

    unverified = ssl_context(WithTLS(("https://db.example",), None, None, 5, tls_verify=False))
    assert unverified is not None and unverified.verify_mode is ssl.CERT_NONE
    assert not unverified.check_hostname
