"""The disk spool: append with fsync, replay in order, reopen, torn and corrupt records, caps."""

from __future__ import annotations

from pathlib import Path

from agent.spool import MAGIC, Spool
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
