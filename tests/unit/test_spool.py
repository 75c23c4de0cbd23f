"""The disk spool: append with fsync, replay in order, reopen, torn and corrupt records, caps."""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from agent.spool import MAGIC, READ_CHUNK, Spool, migrate_folders, spool_folder
from agent.types import Document, FileId, SourceFile

F = SourceFile("src", FileId(1, 2, "ab"))


def docs(start: int, count: int, size: int = 10) -> list[Document]:
    return [Document(f"d{n}", b'{"_id":"d%d","x":"%s"}' % (n, b"y" * size), F, n * 10 + 10)
            for n in range(start, start + count)]


def spool(folder: Path, **kwargs: object) -> Spool:
    s = Spool(folder, **{"max_bytes": 1 << 20, "segment_bytes": 4096, **kwargs})  # type: ignore[arg-type]
    s.open()
    return s


def replay_all(s: Spool, batch: int = 7) -> list[Document]:
    out = []
    while items := s.read(batch, 1 << 20):
        out += [i.doc for i in items]
        s.commit(items)
    return out


def test_replays_in_order_across_segments_and_deletes_them(tmp_path: Path) -> None:
    s = spool(tmp_path)
    written = docs(0, 200)
    for i in range(0, 200, 25):
        assert s.append(written[i:i + 25])
    assert len(list(tmp_path.glob("*.seg"))) > 2
    assert s.pending == 200
    assert s.read(5, 1 << 20) == s.read(5, 1 << 20)  # the same until committed
    assert replay_all(s) == written
    assert s.pending == 0 and list(tmp_path.glob("*.seg")) == []


def test_reopened_spool_replays_what_was_left(tmp_path: Path) -> None:
    s = spool(tmp_path)
    s.append(docs(0, 50))
    first = s.read(20, 1 << 20)
    s.commit(first)
    s.close()
    again = spool(tmp_path)
    # Delivered records of a segment still on disk come again: CouchDB answers conflict.
    assert [d.doc_id for d in replay_all(again)] == [f"d{n}" for n in range(50)]
    assert not again.damaged


def test_torn_tail_is_cut_and_reported(tmp_path: Path) -> None:
    s = spool(tmp_path, segment_bytes=1 << 20)
    s.append(docs(0, 10))
    s.close()
    (segment,) = tmp_path.glob("*.seg")
    segment.write_bytes(segment.read_bytes()[:-7])
    again = spool(tmp_path)
    assert again.damaged and again.stats.torn_records == 1
    assert [d.doc_id for d in replay_all(again)] == [f"d{n}" for n in range(9)]


def test_corrupt_record_is_skipped_counted_and_the_rest_recovered(tmp_path: Path) -> None:
    s = spool(tmp_path, segment_bytes=1 << 20)
    s.append(docs(0, 10))
    s.close()
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    third = [i for i in range(len(data)) if data[i:i + 4] == MAGIC][3]
    data[third + 20] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = spool(tmp_path)
    assert again.damaged and again.stats.corrupt_records == 1
    assert [d.doc_id for d in replay_all(again)] == [f"d{n}" for n in range(10) if n != 3]


def test_a_replay_read_holds_about_its_batch_not_the_segment(tmp_path: Path) -> None:
    # While CouchDB is down the shipper probes by reading the oldest batch again and again:
    # neither that read nor the time between probes may hold the segment (8 MiB by default).
    s = spool(tmp_path, segment_bytes=8 << 20, max_bytes=64 << 20)
    for start in range(0, 6000, 500):
        assert s.append(docs(start, 500, size=1000))
    (segment,) = tmp_path.glob("*.seg")
    assert segment.stat().st_size > 6 << 20
    tracemalloc.start()
    try:
        for _ in range(3):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            batch = s.read(100, 1 << 20)
            _, peak = tracemalloc.get_traced_memory()
            batch_bytes = sum(len(i.doc.body) for i in batch)
            del batch
            after, _ = tracemalloc.get_traced_memory()
            assert peak - before < 2 * batch_bytes + 4 * READ_CHUNK, (peak - before, batch_bytes)
            assert after - before < READ_CHUNK // 4, "the read kept part of the segment"
    finally:
        tracemalloc.stop()
    assert [d.doc_id for d in replay_all(s, batch=1000)] == [f"d{n}" for n in range(6000)]


def test_reads_smaller_than_a_record_change_nothing(tmp_path: Path) -> None:
    # A window of a few bytes: every record and every resync crosses window edges.
    sizes = [10, 3000, 40, 700, 5, 12000, 300, 80, 2500, 9]
    written = [d for n, size in enumerate(sizes) for d in docs(n, 1, size=size)]
    s = spool(tmp_path, segment_bytes=1 << 20, read_chunk=16)
    assert s.append(written)
    s.close()
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    starts = [i for i in range(len(data)) if data[i:i + 4] == MAGIC]
    data[starts[1] + 2000] ^= 0xFF  # the large record 1: its resync reads past many windows
    data[starts[5] + 30] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = spool(tmp_path, read_chunk=16)
    assert again.damaged and again.stats.corrupt_records == 2 and again.pending == 8
    assert again.read(3, 1 << 20) == again.read(3, 1 << 20)  # the same until committed
    assert again.stats.corrupt_records == 2  # each damaged record is counted once
    assert [d.doc_id for d in replay_all(again, batch=3)] == [
        f"d{n}" for n in range(len(sizes)) if n not in (1, 5)]
    assert list(tmp_path.glob("*.seg")) == []


def test_damage_found_while_replaying_in_small_reads_is_counted_once(tmp_path: Path) -> None:
    s = spool(tmp_path, segment_bytes=1 << 20, read_chunk=16)
    assert s.append(docs(0, 10, size=200))
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    starts = [i for i in range(len(data)) if data[i:i + 4] == MAGIC]
    data[starts[0] + 50] ^= 0xFF
    data[starts[4] + 50] ^= 0xFF
    segment.write_bytes(bytes(data))
    first = s.read(6, 1 << 20)
    assert [i.doc.doc_id for i in first] == ["d1", "d2", "d3", "d5", "d6", "d7"]
    assert s.read(6, 1 << 20) == first and s.stats.corrupt_records == 2
    s.commit(first)
    assert [d.doc_id for d in replay_all(s)] == ["d8", "d9"]
    assert s.stats.corrupt_records == 2 and s.damaged and s.pending == 0


def test_garbage_segment_never_stops_the_spool(tmp_path: Path) -> None:
    (tmp_path / "000000000001.seg").write_bytes(b"\x00garbage" * 100 + MAGIC + b"\xff" * 30)
    s = spool(tmp_path)
    assert s.damaged and s.pending == 0
    assert s.append(docs(0, 3))
    assert len(replay_all(s)) == 3


def test_full_spool_blocks(tmp_path: Path) -> None:
    s = spool(tmp_path, max_bytes=3000, segment_bytes=1000)
    appended = 0
    while s.append(docs(appended, 5)):
        appended += 5
    assert s.stats.full and s.stats.bytes <= 3000 and appended > 0
    assert len(replay_all(s)) == appended
    assert s.append(docs(0, 5))


def test_drop_oldest_makes_room_and_counts(tmp_path: Path) -> None:
    s = spool(tmp_path, max_bytes=3000, segment_bytes=1000, when_full="drop_oldest")
    for n in range(0, 200, 5):
        assert s.append(docs(n, 5))
    assert s.stats.bytes <= 3000 and s.stats.dropped_records > 0
    survivors = replay_all(s)
    assert len(survivors) + s.stats.dropped_records == 200
    assert survivors[-1].doc_id == "d199"


def test_database_names_map_to_folders_one_to_one(tmp_path: Path) -> None:
    names = ["app/x", "app//x", "app%2Fx", "a$b(c)+d-e_f", "plain"]
    folders = [spool_folder(tmp_path, n) for n in names]
    assert len(set(folders)) == len(names)
    assert all(f.parent == tmp_path for f in folders)
    assert spool_folder(tmp_path, "plain") == tmp_path / "plain"
    a, b = spool(folders[0]), spool(folders[1])
    a.append(docs(0, 3))
    b.append(docs(10, 2))
    a.close()
    b.close()
    assert [d.doc_id for d in replay_all(spool(folders[0]))] == ["d0", "d1", "d2"]
    assert [d.doc_id for d in replay_all(spool(folders[1]))] == ["d10", "d11"]


def test_spools_under_the_old_folder_names_are_migrated(tmp_path: Path) -> None:
    old = spool(tmp_path / "app" / "x")
    old.append(docs(0, 4))
    old.close()
    shared = spool(tmp_path / "web" / "y")
    shared.append(docs(20, 1))
    shared.close()
    migrate_folders(tmp_path, ["app/x", "web/y", "web//y", "plain"])
    assert [d.doc_id for d in replay_all(spool(spool_folder(tmp_path, "app/x")))] == [
        "d0", "d1", "d2", "d3"]
    assert not list((tmp_path / "app" / "x").glob("*.seg"))
    # Two databases claim web/y: its documents cannot be attributed, so they stay put.
    assert len(list((tmp_path / "web" / "y").glob("*.seg"))) == 1
    assert spool(spool_folder(tmp_path, "web/y")).pending == 0


def test_a_spool_folder_that_cannot_be_made_is_a_full_spool_not_a_crash(tmp_path: Path) -> None:
    blocked = tmp_path / "spool"
    blocked.write_bytes(b"a file where the folder should be")
    s = spool(blocked / "db")
    with pytest.raises(OSError):
        s.append(docs(0, 2))
    assert s.pending == 0 and s.read(10, 1 << 20) == []
    blocked.unlink()
    assert s.append(docs(0, 2))
    assert [d.doc_id for d in replay_all(s)] == ["d0", "d1"]


def test_an_unwritable_segment_is_never_listed(tmp_path: Path) -> None:
    s = spool(tmp_path, segment_bytes=100)
    assert s.append(docs(0, 1))
    (tmp_path / "000000000002.seg").mkdir()  # the next segment cannot be opened
    with pytest.raises(OSError):
        s.append(docs(1, 1))
    assert [d.doc_id for d in replay_all(s)] == ["d0"]


def test_close_waits_for_an_append_still_running_in_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled `asyncio.to_thread(spool.append)` keeps running; shutdown then closes the
    spool. The close must wait, or the append fsyncs a closed (or reused) descriptor."""
    s = spool(tmp_path, segment_bytes=1 << 20)
    s.append(docs(0, 1))
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        in_fsync.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr("agent.spool.os.fsync", slow_fsync)
    outcome: list[object] = []

    def append() -> None:
        try:
            outcome.append(s.append(docs(1, 5)))
        except OSError as exc:
            outcome.append(exc)

    writer = threading.Thread(target=append)
    writer.start()
    assert in_fsync.wait(10)
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(0.5)
    closed_early = not closer.is_alive()
    release.set()
    writer.join(10)
    closer.join(10)
    assert not closed_early, "close did not wait for the append in flight"
    assert outcome == [True]
    monkeypatch.setattr("agent.spool.os.fsync", real_fsync)
    assert [d.doc_id for d in replay_all(spool(tmp_path))] == [f"d{n}" for n in range(6)]
