"""A small HTTP proxy in front of the real test server that injects faults on request.

Modes: "pass" (forward), "reset" (drop the connection), "stall" (never answer),
"500" (answer an error), "401" (refuse the credentials), "slow" (forward after a delay), "413" (refuse bodies
over `max_body` bytes, forward the rest), "flap" (pick one of those per request). Modes that
only touch `_bulk_docs` (other requests pass): "html400" (a 400 with a proxy's HTML page),
"html201" (a 201 whose body is a page, not CouchDB's results; nothing is stored),
"404" (no such database, though creating it answers that it exists), "doc_error" (forward,
but answer each document whose JSON contains `poison` with a per-document error).
It runs on its own event loop in a thread, so a test can flip modes while the
agent runs in another process.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Literal
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, web

Mode = Literal["pass", "reset", "stall", "500", "slow", "413", "401", "flap", "html400", "404",
               "doc_error", "html201"]
FLAP = ("pass", "pass", "pass", "reset", "500", "stall", "slow", "413")
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        # The agent sends its own credentials; the proxy only forwards them.
        self.upstream = f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path.rstrip('/')}"
        self.mode: Mode = "pass"
        self.max_body = 64 * 1024
        self.delay = 0.3
        self.requests = 0
        self.bulk_requests = 0
        """`_bulk_docs` requests only (not probes, not database creation)."""
        self.poison = b"poison"
        self.faults = 0
        self.in_flight = 0
        self.most_in_flight = 0
        """The most requests the proxy was handling at once."""
        self.port = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def set(self, mode: Mode) -> None:
        self.mode = mode

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with ClientSession(timeout=ClientTimeout(total=60)) as session:
            app = web.Application(client_max_size=1 << 30)
            async def handle(request: web.Request) -> web.StreamResponse:
                return await self._handle(request, session)

            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _handle(self, request: web.Request, session: ClientSession) -> web.StreamResponse:
        self.requests += 1
        # Only the shipper's sends count as in flight: the agent's fleet document and probes
        # travel beside them on purpose.
        bulk = request.method == "POST" and request.path.endswith("/_bulk_docs")
        self.in_flight += bulk
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._answer(request, session)
        finally:
            self.in_flight -= bulk

    async def _answer(self, request: web.Request, session: ClientSession) -> web.StreamResponse:
        body = await request.read()
        mode = self.mode if self.mode != "flap" else self._random.choice(FLAP)
        bulk = request.method == "POST" and request.path.endswith("/_bulk_docs")
        self.bulk_requests += bulk
        if mode in ("html400", "404", "doc_error", "html201") and not bulk:
            mode = "pass"
        if mode in ("html400", "html201"):
            self.faults += 1
            return web.Response(status=int(mode[4:]), content_type="text/html",
                                text="<html><body><h1>Bad Request</h1><hr>nginx</body></html>")
        if mode == "404":
            self.faults += 1
            return web.json_response({"error": "not_found", "reason": "Database does not exist."},
                                     status=404)
        if mode == "doc_error":
            return await self._poisoned(request, session, body)
        if mode == "413" and len(body) <= self.max_body:
            mode = "pass"
        if mode != "pass":
            self.faults += 1
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if mode == "stall":
            await asyncio.sleep(3600)
        if mode == "401":
            return web.json_response({"error": "unauthorized", "reason": "injected"}, status=401)
        if mode == "500":
            return web.json_response({"error": "internal_server_error", "reason": "injected"},
                                     status=500)
        if mode == "413":
            return web.json_response({"error": "too_large", "reason": "injected"}, status=413)
        if mode == "slow":
            await asyncio.sleep(self.delay)
        return await self._forward(request, session, body)

    async def _forward(self, request: web.Request, session: ClientSession,
                       body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with session.request(request.method, self.upstream + request.path_qs, data=body,
                                   headers=headers) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items()
                           if k.lower() not in HOP_HEADERS | {"content-encoding"}}
            return web.Response(status=upstream.status, body=payload, headers=out_headers)

    async def _poisoned(self, request: web.Request, session: ClientSession,
                        body: bytes) -> web.Response:
        """Forward the documents without `poison`; answer the others with an error that is
        neither final nor a conflict, as a node in trouble might."""
        docs = json.loads(body)["docs"]
        poisoned = [d for d in docs if self.poison in json.dumps(d).encode()]
        clean = [d for d in docs if d not in poisoned]
        self.faults += len(poisoned)
        results = []
        if clean:
            response = await self._forward(request, session, json.dumps({"docs": clean}).encode())
            if response.status not in (201, 202):
                return response
            assert isinstance(response.body, bytes)
            results = json.loads(response.body)
        results += [{"id": d["_id"], "error": "unknown_error", "reason": "injected"}
                    for d in poisoned]
        return web.json_response(results, status=201)
