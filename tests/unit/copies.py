"""A TailerSet following `app.log*` in a folder, for the copy-truncate tests: which file ids
each path was read under (the ids of its documents), and how many lines of app.log were read.
Nothing is acknowledged: an adopted copy reads from the original's committed offset under the
original's id, where CouchDB would answer conflict for what it had, so "read again" means read
under an id the original was not read under."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from agent.offsets import OffsetStore
from agent.tailer import Found, Tailer, TailerSet
from agent.types import FileId, Lines, SourceFile
from tests.unit.sources import source


def start_tailer(tailer: Tailer) -> asyncio.Task[None]:
    return asyncio.create_task(tailer.run())


class Scene:
    def __init__(self, folder: Path) -> None:
        self.log, self.copy = folder / "app.log", folder / "app.log.1"
        self.config = source(paths=[str(folder / "app.log*")])
        self.got: dict[str, set[FileId]] = {}
        self.read = 0
        """Lines read from app.log."""
        self.tailers = TailerSet(start_tailer, [self.config], {"s": self.sink}, OffsetStore(),
                                 {"s": "beginning"})

    async def sink(self, file: SourceFile, path: str, lines: Lines, end_marker: str) -> None:
        self.got.setdefault(path, set()).add(file.file_id)
        if path == str(self.log):
            self.read += len(lines.ends)

    def scan(self, *paths: Path) -> None:
        """What a scan that finds these files tells the tailers."""
        self.tailers.reconcile([Found("s", str(p), p.stat().st_dev, p.stat().st_ino,
                                      p.stat().st_size) for p in paths], ["s"])

    async def read_log(self, lines: int) -> None:
        async with asyncio.timeout(60):  # a bound for a hang, not a timing check
            while self.read < lines:
                await asyncio.sleep(0.02)

    async def finish(self) -> None:
        """Until the copy is claimed (adopted, or read as new) and read to its end; then stop."""
        async with asyncio.timeout(60):
            while any(t.path == str(self.copy) and t.file is None
                      for t in self.tailers.live.values()):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for tailer in self.tailers.live.values():
            tailer.wake()
        await asyncio.sleep(0.5)
        await self.tailers.stop()

    def copy_read_again(self) -> bool:
        return not self.got.get(str(self.copy), set()) <= self.got.get(str(self.log), set())


async def follow_original_then_copy(folder: Path, write_copy: threading.Thread | None,
                                    copy_bytes: bytes | None = None) -> Scene:
    """Follow app.log to its end, then let a scan find app.log.1: its copy, written by
    `write_copy` (then app.log is truncated, as copytruncate does), or `copy_bytes` at once."""
    scene = Scene(folder)
    scene.scan(scene.log)
    await scene.read_log(scene.log.read_bytes().count(b"\n"))
    if copy_bytes is not None:
        scene.copy.write_bytes(copy_bytes)
    if write_copy is not None:
        write_copy.start()
        while not scene.copy.exists() or scene.copy.stat().st_size < 100_000:
            await asyncio.sleep(0.01)
    scene.scan(scene.log, scene.copy)
    if write_copy is not None:
        await asyncio.to_thread(write_copy.join)
        os.truncate(scene.log, 0)  # copytruncate: the copy is whole, then the original goes
        scene.tailers.hint(str(scene.log))
    await scene.finish()
    return scene
