"""Headless Chromium from Debian's packages, driven over the DevTools protocol (aiohttp websocket).

No browser download and no playwright: the `chromium` package, started with a fresh profile and
`--remote-debugging-port=0`; the port it picked is read from the profile's DevToolsActivePort.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from backend.pouchdb_server import stop_process, wait_started

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0")
Handler = Callable[[dict[str, Any]], Awaitable[None]]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One Chromium process and one page, with `send` for commands and `on` for events."""

    def __init__(self, binary: str, flags: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.flags = flags
        self.profile = Path(tempfile.mkdtemp(prefix="couchlog-chromium-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._handlers: dict[str, Handler] = {}
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, timeout: float = 30.0) -> Browser:
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, *self.flags, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=open(self.profile / "stderr.log", "wb"))  # noqa: SIM115
        port_file = self.profile / "DevToolsActivePort"
        async with asyncio.timeout(timeout):
            await asyncio.to_thread(
                wait_started, self.process,
                lambda: port_file.exists() and bool(port_file.read_text().strip()),
                timeout, "chromium", self.profile / "stderr.log")
            port = int(port_file.read_text().split()[0])
            self._session = aiohttp.ClientSession()
            page = None
            while page is None:
                async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json()
                page = next((t for t in targets if t.get("type") == "page"), None)
                if page is None:
                    await asyncio.sleep(0.1)
            self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
            elif data.get("method") in self._handlers:
                # Handlers send commands themselves, so they run beside this reader, not in it.
                task = asyncio.create_task(self._handlers[data["method"]](data.get("params", {})))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def on(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    async def send(self, method: str, **params: Any) -> Any:
        assert self._ws is not None
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(60):
            return await future

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str,
                       show: str = "document.body.innerText.slice(0, 1500)") -> Any:
        """Poll a page expression until it is truthy; its value. On a timeout the assertion
        shows `show` (by default the page's text)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    value = await self.evaluate(expression)
                    if value:
                        return value
                    await asyncio.sleep(0.1)
        except TimeoutError:
            seen = await self.evaluate(show)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; the page "
                                 f"shows:\n{seen}") from None

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        stop_process(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)
