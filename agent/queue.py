"""The bounded in-memory queue between parsing and shipping, for one database.

Capacity is counted in documents and in bytes. `put` waits while the queue
is full, which stops the tailer that called it: the log file holds the data
meanwhile (backpressure, never loss). `take` forms batches by count, bytes
and linger time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from agent.types import Document


class DocumentQueue:
    def __init__(self, max_docs: int, max_bytes: int) -> None:
        self.max_docs = max_docs
        self.max_bytes = max_bytes
        self._docs: deque[Document] = deque()
        self._bytes = 0
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._docs)

    def _has_room(self) -> bool:
        # An empty queue takes any batch, so a batch larger than the cap cannot wait forever.
        return not self._docs or (len(self._docs) < self.max_docs and self._bytes < self.max_bytes)

    async def put(self, docs: Sequence[Document]) -> None:
        """Append `docs` in order, waiting while the queue is full."""
        if not docs:
            return
        async with self._changed:
            await self._changed.wait_for(self._has_room)
            self._docs.extend(docs)
            self._bytes += sum(len(d.body) for d in docs)
            self._changed.notify_all()

    async def take(self, max_docs: int, max_bytes: int, linger: float,
                   timeout: float | None = None) -> list[Document]:
        """Wait for documents, then up to `linger` seconds for a full batch; return at most
        `max_docs` documents and `max_bytes` bytes, at least one unless `timeout` passed first."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: bool(self._docs))
            except TimeoutError:
                return []
            deadline = time.monotonic() + linger
            while len(self._docs) < max_docs and self._bytes < max_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    break
            batch = [self._docs.popleft()]
            size = len(batch[0].body)
            while self._docs and len(batch) < max_docs:
                nxt = len(self._docs[0].body)
                if size + nxt > max_bytes:
                    break
                batch.append(self._docs.popleft())
                size += nxt
            self._bytes -= size
            self._changed.notify_all()
            return batch

    def take_all(self) -> list[Document]:
        """Everything queued, at once (for the spool, at shutdown)."""
        docs = list(self._docs)
        self._docs.clear()
        self._bytes = 0
        return docs
