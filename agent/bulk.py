"""What `_bulk_docs` answers mean: pure functions and records, no I/O.

`verdict` reads a whole response (use its results, split the batch, create
the database, or count the request as failed); `classify_results` reads the
per-document results; `RetryBudget` bounds how often one document is sent
again after a per-document error before it is given up (dead-lettered).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from agent.deadletter import Rejection
from agent.types import Document

BODY = operator.attrgetter("body")

FINAL_DOC_ERRORS = frozenset({"forbidden", "unauthorized"})
"""Per-document errors that retrying cannot fix (a validate_doc_update refusal)."""

DOC_ATTEMPTS = 5
"""Answers with a per-document error (other than the final ones) a document may get before it
is dead-lettered with the last error: enough to ride out a node's hiccup, few enough that one
bad document cannot keep a batch coming back forever."""

NO_RESULT = ("no_result", "CouchDB's answer had no result for this document")


def bulk_body(docs: Sequence[Document]) -> bytes:
    return b'{"docs":[' + b",".join(map(BODY, docs)) + b"]}"


class Verdict(enum.Enum):
    RESULTS = "results"
    """Per-document results to classify."""
    SPLIT = "split"
    """CouchDB refused the batch as a whole because of its content: halve it."""
    MISSING = "missing"
    """No such database (or not visible to the agent's user): try to create it."""
    REFUSED = "refused"
    """The credentials were refused."""
    FAILED = "failed"
    """No usable answer (a server error, a proxy's page): the batch is kept and sent again."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A `_bulk_docs` response, its body parsed once: the results of a big batch are the
    costliest JSON the agent reads, so the verdict and the per-document results share it."""

    status: int
    body: bytes
    json: Any
    """The body as JSON; None if it is not JSON."""

    @classmethod
    def of(cls, status: int, body: bytes) -> Answer:
        return cls(status, body, parse(body))


def verdict(answer: Answer) -> Verdict:
    """What to do with a `_bulk_docs` answer. A 400 or 413 means the content is at fault only
    when CouchDB says so (a JSON error): a proxy's HTML page is a failed request. So is a 201
    without CouchDB's list of results: it says nothing about any document, and charging each
    document a retry for it would dead-letter them all."""
    status, parsed = answer.status, answer.json
    if status in (201, 202):
        return Verdict.RESULTS if isinstance(parsed, list) else Verdict.FAILED
    if status in (400, 413):
        return Verdict.SPLIT if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) \
            else Verdict.FAILED
    if status in (401, 403):
        return Verdict.REFUSED
    if status == 404:
        return Verdict.MISSING
    return Verdict.FAILED


def describe(body: bytes) -> str:
    """A short account of an error body, for logs and the status."""
    parsed = parse(body)
    if isinstance(parsed, dict):
        return f"{parsed.get('error', '')}: {parsed.get('reason', '')}".strip(": ")
    return body[:200].decode("utf-8", "replace")


def parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


@dataclass(slots=True)
class Outcome:
    """What a `_bulk_docs` answer means for each document of the batch."""

    stored: list[Document] = field(default_factory=list)
    conflicts: list[Document] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    retry: list[Document] = field(default_factory=list)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    """For each document in `retry`, by `_id`: the error and reason it got."""


def classify_results(docs: Sequence[Document], results: Any) -> Outcome:
    """Match each document with its result by `_id`; a document without a result is retried."""
    outcome = Outcome()
    by_id: dict[str, Any] = {}
    if isinstance(results, list):
        for item in results:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                by_id.setdefault(item["id"], item)
    for doc in docs:
        result = by_id.get(doc.doc_id)
        if result is None:
            outcome.retry.append(doc)
            outcome.errors[doc.doc_id] = NO_RESULT
        elif result.get("ok") is True or ("rev" in result and "error" not in result):
            outcome.stored.append(doc)
        elif result.get("error") == "conflict":
            outcome.conflicts.append(doc)
        elif result.get("error") in FINAL_DOC_ERRORS:
            outcome.rejected.append(Rejection(doc, str(result["error"]),
                                              str(result.get("reason", ""))))
        else:
            outcome.retry.append(doc)
            outcome.errors[doc.doc_id] = (str(result.get("error")), str(result.get("reason", "")))
    return outcome


class RetryBudget:
    """How many per-document errors each document got; past `attempts`, it is given up.
    Holds only documents waiting for a retry (they sit in the spool, which is bounded)."""

    def __init__(self, attempts: int = DOC_ATTEMPTS) -> None:
        self.attempts = attempts
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def charge(self, outcome: Outcome) -> list[Rejection]:
        """Count this answer against each document in `outcome.retry`; move those out of
        attempts from `retry` and return them as rejections with their last error."""
        given_up: list[Rejection] = []
        keep: list[Document] = []
        for doc in outcome.retry:
            count = self._counts.get(doc.doc_id, 0) + 1
            if count >= self.attempts:
                self._counts.pop(doc.doc_id, None)
                error, reason = outcome.errors.get(doc.doc_id, NO_RESULT)
                given_up.append(Rejection(doc, error, f"{reason} (after {count} attempts)"))
            else:
                self._counts[doc.doc_id] = count
                keep.append(doc)
        outcome.retry = keep
        return given_up

    def most(self, docs: Iterable[Document]) -> int:
        """The most attempts any of `docs` has had (for the backoff before the next)."""
        return max((self._counts.get(d.doc_id, 0) for d in docs), default=0)

    def settled(self, docs: Iterable[Document]) -> None:
        if not self._counts:
            return  # the usual case: nothing to look up for a whole batch
        for doc in docs:
            self._counts.pop(doc.doc_id, None)
