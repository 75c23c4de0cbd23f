"""The in-memory queue is bounded in documents and bytes: a full queue makes `put` wait."""

from __future__ import annotations

import asyncio

from agent.queue import DocumentQueue
from agent.types import Document, FileId, SourceFile

F = SourceFile("s", FileId(1, 1, "ff"))


def docs(count: int, size: int = 10) -> list[Document]:
    return [Document(f"d{n}", b"x" * size, F, n + 1) for n in range(count)]


async def test_put_waits_while_full_by_count_and_resumes_after_take() -> None:
    queue = DocumentQueue(max_docs=5, max_bytes=10_000)
    await queue.put(docs(5))
    blocked = asyncio.create_task(queue.put(docs(1)))
    await asyncio.sleep(0.05)
    assert not blocked.done() and len(queue) == 5
    assert len(await queue.take(3, 10_000, linger=0)) == 3
    await asyncio.wait_for(blocked, 1)
    assert len(queue) == 3


async def test_put_waits_while_full_by_bytes() -> None:
    queue = DocumentQueue(max_docs=1000, max_bytes=100)
    await queue.put(docs(10, size=10))
    blocked = asyncio.create_task(queue.put(docs(1)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await queue.take(10, 50, linger=0)
    await asyncio.wait_for(blocked, 1)


async def test_take_respects_batch_limits_and_timeout() -> None:
    queue = DocumentQueue(max_docs=100, max_bytes=10_000)
    assert await queue.take(10, 1000, linger=0, timeout=0.01) == []
    await queue.put(docs(7, size=10))
    assert len(await queue.take(10, 35, linger=0)) == 3
    assert len(await queue.take(2, 1000, linger=0)) == 2
