"""`agent send`: the seed's cron pipeline (format, then one curl per line) as one command.

Lines come from a file or stdin, are parsed as JSON (`--db`) or with a
source's parser (`-c CONFIG --source NAME`), and go to `_bulk_docs` in
batches. Each document's `_id` is deterministic: the line's offset and a
hash of the input's name (its absolute path, or `--name`) and of its bytes up
to and including the line. A rerun over the same input (or a longer version of
it, appended to) is answered `conflict` and doubles nothing, while two inputs
never share an id; unnamed stdin is a new input on every run. Without
credentials (through the nginx front) the ids take the public writer's
prefix. The exit code says what failed; the summary goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson

from agent import config as config_module
from agent.bulk import bulk_body, classify_results
from agent.config import AgentConfig, ConfigError, Problem, SourceConfig
from agent.counters import SourceCounters
from agent.lines import Splitter, splitter_for
from agent.parser import SourceParser
from agent.setup import PUBLIC_ID_PREFIX, Client, SetupError, split_credentials
from agent.types import Document, FileId, Lines, SourceFile

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
"""CouchDB could not be reached, or kept failing, after every retry."""
EXIT_USAGE = 2
EXIT_INPUT = 3
"""An input file could not be read."""
EXIT_REFUSED = 4
"""CouchDB refused documents (validation) or the credentials (401/403)."""
EXIT_NO_DATABASE = 5
"""The database does not exist and cannot be created by this user: run `agent setup`."""

READ_SIZE = 256 * 1024
SEND_FILE = SourceFile("send", FileId(0, 0, "send"))
"""`Document` records need a file; `agent send` commits no offsets, so one stands for all."""


class Stop(Exception):
    """Sending cannot go on; `code` is the exit code and the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Tally:
    stored: int = 0
    already: int = 0
    refused: int = 0
    first_refusal: str = ""
    unsent: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    auth: tuple[str, str] | None
    db: str


def command(args: argparse.Namespace, config: AgentConfig | None) -> int:
    source, target = _resolve(args, config)
    if args.batch_size <= 0 or args.retries < 0:
        raise ConfigError([Problem("agent send", "--batch-size", "expected --batch-size > 0 and "
                                   "--retries >= 0")])
    client = Client(target.url, target.auth, args.ca_file)
    counters = SourceCounters()
    parser = SourceParser(source, host=config.host if config else _hostname(), counters=counters)
    sender = Sender(client, target, args.retries)
    code = EXIT_OK
    held: list[str] = []
    try:
        for name in args.files or ["-"]:
            batches = _documents(parser, name, args.name, target, args.batch_size, args.random_ids,
                                 held)
            for batch in batches:
                sender.send(batch)
    except OSError as exc:
        print(f"agent send: cannot read {exc.filename or 'stdin'}: {exc.strerror or exc}",
              file=sys.stderr)
        code = EXIT_INPUT
    except Stop as exc:
        print(f"agent send: {exc}", file=sys.stderr)
        code = exc.code
    for name in held:
        print(f"agent send: {name}: its last line has no newline yet (the file may still be "
              "written), so it was not sent; a run after the line is finished sends it",
              file=sys.stderr)
    tally = sender.tally
    c = counters
    print(f"agent send: {c.lines} lines read, {c.matched + c.unmatched - c.dropped_unmatched} kept, "
          f"{c.filtered + c.empty} filtered, {c.unmatched} not parsed; {tally.stored} stored, "
          f"{tally.already} already stored, {tally.refused} refused, {tally.unsent} not sent "
          f"({target.db} at {target.url})", file=sys.stderr)
    if code == EXIT_OK and tally.refused:
        print(f"agent send: CouchDB refused {tally.refused} document(s), first: "
              f"{tally.first_refusal}", file=sys.stderr)
        code = EXIT_REFUSED
    return code


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _resolve(args: argparse.Namespace, config: AgentConfig | None) -> tuple[SourceConfig, Target]:
    problems: list[Problem] = []
    source: SourceConfig | None = None
    if args.source is not None:
        if config is None:
            raise ConfigError([Problem("agent send", "--source", "needs -c CONFIG")])
        source = next((s for s in config.sources if s.name == args.source), None)
        if source is None:
            names = ", ".join(s.name for s in config.sources)
            raise ConfigError([Problem(config.sources_dir, "--source",
                                       f"no source named {args.source!r} (sources: {names})")])
    else:
        source = config_module.source_from_mapping(
            "agent send", {"name": "send", "paths": ["-"], "format": "json"}, problems)
    db = args.db or (source.database if source is not None and args.source else None)
    if db is None:
        problems.append(Problem("agent send", "--db", "give --db NAME (or --source NAME)"))
    url = args.url or (config.couchdb.urls[0] if config is not None and config.couchdb.urls else None)
    if url is None:
        problems.append(Problem("agent send", "--url", "give --url or -c CONFIG with couchdb.url"))
    if problems or source is None or db is None or url is None:
        raise ConfigError(problems)
    try:
        bare, auth = split_credentials(url)
    except ValueError as exc:
        raise ConfigError([Problem("agent send", "--url", str(exc))]) from None
    if auth is None and not args.url and config is not None and config.couchdb.username is not None:
        auth = (config.couchdb.username, config.couchdb.password or "")
    return source, Target(bare, auth, db)


def _documents(parser: SourceParser, name: str, id_name: str | None, target: Target,
               batch_size: int, random_ids: bool, held: list[str]) -> Iterator[list[Document]]:
    """Batches of documents from one input, with ids as the module docstring says; `name` is
    added to `held` if its unfinished last line was held back."""
    source = parser.source
    label = source.name
    prefix = f"{label}:send:" if target.auth is not None else f"{PUBLIC_ID_PREFIX}{label}."
    meta_key = source.metadata_key
    path = "-" if name == "-" else os.path.abspath(name)
    sent_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    meta = {"source": label, "host": parser.host, "path": path, "read_at": sent_at}
    # Stdin has no name to recognise a rerun by: unnamed, each run is a new input (a cron job's
    # `echo '{"msg":"backup ok"}' | agent send -` must store every day's line, not only the first).
    input_name = id_name or (f"-{uuid.uuid4().hex}" if path == "-" else path)
    running = hashlib.blake2b(input_name.encode() + b"\n", digest_size=8)
    batch: list[Document] = []
    for lines in read_lines(name, splitter_for(source.encoding, source.max_line_bytes), held):
        hashes = []
        for data in lines.data:
            running.update(data)
            running.update(b"\n")
            hashes.append(running.hexdigest())
        for i, fields, error in parser.kept(lines):
            offset = lines.offsets[i]
            doc_meta: dict[str, Any] = {**meta, "offset": offset}
            if error is not None:
                doc_meta["parse_error"] = error
            if i in lines.truncated:
                doc_meta["truncated"] = True
            fields[meta_key] = doc_meta
            # A random id is still chosen here, not by CouchDB, so a retried batch keeps it.
            doc_id = uuid.uuid4().hex if random_ids else f"{prefix}{offset:012x}.{hashes[i]}"
            fields["_id"] = doc_id
            batch.append(Document(doc_id, orjson.dumps(fields), SEND_FILE, lines.ends[i]))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def read_lines(name: str, splitter: Splitter, held: list[str] | None = None) -> Iterator[Lines]:
    """Lines of a file, or of stdin for "-", a chunk at a time as they arrive (`read1`, so
    `tail -f log | agent parse` shows each line at once); the last needs no newline. With
    `held` (agent send), a regular file's last line without a newline is held back (`name` goes
    into `held`): it may be half written, and sent now, then whole by the next run, it would be
    stored twice (broken, then right). Stdin and pipes have ended for good: theirs is sent."""
    stream: BinaryIO
    if name == "-":
        stream, close = sys.stdin.buffer, False
    else:
        stream, close = open(name, "rb"), True  # noqa: SIM115 - closed below, after a streaming loop
    try:
        read = getattr(stream, "read1", stream.read)
        while chunk := read(READ_SIZE):
            lines = splitter.feed(chunk)
            if lines:
                yield lines
        last = splitter.flush()
        if last is not None and held is not None and name != "-" and \
                stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            held.append(name)
        elif last is not None:
            yield Lines.of([last])
    finally:
        if close:
            stream.close()


class Sender:
    """Posts batches to `_bulk_docs`, retrying what CouchDB did not store, with backoff."""

    def __init__(self, client: Client, target: Target, retries: int, backoff: float = 1.0,
                 max_backoff: float = 30.0) -> None:
        self.client = client
        self.path = "/" + target.db.replace("/", "%2F") + "/_bulk_docs"
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tally = Tally()

    def send(self, docs: list[Document]) -> None:
        pending = docs
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            pending = self._post(pending, last=attempt == self.retries)
            if not pending:
                return
        self.tally.unsent += len(pending)
        raise Stop(EXIT_UNAVAILABLE, f"{len(pending)} document(s) not stored after "
                   f"{self.retries} retries, and the rest of the input not sent; run again: "
                   "what is stored already is not doubled")

    def _post(self, docs: list[Document], last: bool) -> list[Document]:
        """The documents to retry; raises Stop when retrying cannot help."""
        self.tally.requests += 1
        try:
            status, body = self.client.request("POST", self.path, bulk_body(docs))
        except SetupError as exc:
            if last:
                self.tally.unsent += len(docs)
                raise Stop(EXIT_UNAVAILABLE, f"{exc}; nothing from here on was sent") from None
            return docs
        if status in (401, 403):
            self.tally.unsent += len(docs)
            raise Stop(EXIT_REFUSED, f"CouchDB answered HTTP {status} {_error(body)}: check the "
                       "user and password (or, through the front, that the database is log_*)")
        if status == 404:
            self.tally.unsent += len(docs)
            raise Stop(EXIT_NO_DATABASE, f"database {self.path.split('/')[1]} does not exist: "
                       "create it with 'agent setup' (as a CouchDB admin)")
        if status == 413 and len(docs) > 1:
            # Too big for the front (client_max_body_size) or CouchDB: halves, until one fits.
            half = len(docs) // 2
            self.send(docs[:half])
            self.send(docs[half:])
            return []
        if status == 413:
            self.tally.refused += 1
            if not self.tally.first_refusal:
                self.tally.first_refusal = f"{docs[0].doc_id}: HTTP 413, too large on its own"
            return []
        if status in (400, 415):
            self.tally.unsent += len(docs)
            raise Stop(EXIT_REFUSED, f"CouchDB refused the batch: HTTP {status} {_error(body)}")
        if status not in (201, 202):
            return docs
        outcome = classify_results(docs, body)
        self.tally.stored += len(outcome.stored)
        self.tally.already += len(outcome.conflicts)
        self.tally.refused += len(outcome.rejected)
        if outcome.rejected and not self.tally.first_refusal:
            first = outcome.rejected[0]
            self.tally.first_refusal = f"{first.doc.doc_id}: {first.error} {first.reason}"
        return outcome.retry


def _error(body: Any) -> str:
    return str(body.get("error", "")) if isinstance(body, dict) else ""
