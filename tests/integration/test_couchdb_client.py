"""The CouchDB client against the real server: typed responses, and the probe's feature
detection (CouchDB 3 has `/_up`; pouchdb-server has not, and is probed with `GET /`)."""

from __future__ import annotations

import socket
from urllib.parse import quote

import aiohttp
import pytest

from agent.config import CouchDBConfig
from agent.couchdb import CouchDBClient, endpoints

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_probe_and_bulk_docs_answer_with_typed_responses(couchdb_url: str,
                                                               database: str) -> None:
    (live,) = endpoints(CouchDBConfig((couchdb_url,), None, None, 5))
    (dead,) = endpoints(CouchDBConfig((f"http://127.0.0.1:{free_port()}",), None, None, 5))
    async with aiohttp.ClientSession() as session:
        client = CouchDBClient(session, 5)
        assert await client.up(live)
        assert await client.up(live)  # again, with what it learned about /_up
        assert not await client.up(dead)
        path = "/" + quote(database, safe="")
        stored = await client.bulk_docs(live, path, b'{"docs":[{"_id":"a"}]}')
        assert stored.answered and stored.status in (201, 202) and b'"a"' in stored.body
        missing = await client.bulk_docs(live, path + "_missing", b'{"docs":[]}')
        assert missing.answered and missing.status == 404
        exists = await client.create_database(live, path)
        assert exists.status == 412
        unreachable = await client.bulk_docs(dead, path, b'{"docs":[]}')
        assert not unreachable.answered and unreachable.status == 0
        assert unreachable.error is not None and "Connect" in unreachable.error
