"""The delivery torture suite: kill -9, a backend that goes down, flaps, refuses or fills the spool,
corrupted spool and state files, and a full disk. Every test ends with the exact multiset of
documents in the database against the lines written."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentproc import wait_for
from tests.couch import CouchDB
from tests.faultproxy import FaultProxy
from tests.integration.faults import (
    agent_status,
    failover_flow,
    flow_via,
    refuse_secrets,
    spooled_bytes,
    through,
)
from tests.integration.harness import Pipeline, append, events, numbered

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(couchdb_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(couchdb_url, seed=4) as running:
        yield running


class Writer(threading.Thread):
    """Writes lines at a steady rate, rotating by rename now and then, until stopped."""

    def __init__(self, logs: Path, prefix: str, rate: int = 4000, rotate_every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.logs, self.prefix, self.rate, self.rotate_every = logs, prefix, rate, rotate_every
        self.written: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        path = self.logs / "app.log"
        started = next_rotation = time.monotonic()
        n = rotations = 0
        while not self._halt.is_set():
            lines = numbered(self.prefix, n, self.rate // 20)
            self.written += append(path, lines)
            n += len(lines)
            if self.rotate_every and time.monotonic() - next_rotation >= self.rotate_every:
                rotations += 1
                os.rename(path, self.logs / f"app.log.{self.prefix}.{rotations}")
                next_rotation = time.monotonic()
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)

    def stop(self) -> Counter[str]:
        self._halt.set()
        self.join(10)
        return self.written


def test_a_kill_9_at_random_moments_during_heavy_shipping(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    rng = random.Random(20)
    written = append(logs / "app.log", numbered("backlog", 0, 30000))
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs)
    writer = Writer(logs, "live", rate=3000)
    writer.start()
    try:
        for kill in range(20):
            # Every other run the backend misbehaves, so kills also land in spool writes and replays.
            proxy.set("flap" if kill % 2 else "pass")
            flow.agent.start()
            time.sleep(rng.uniform(0.3, 1.2))
            flow.agent.kill()
    finally:
        written += writer.stop()
    proxy.set("pass")
    flow.start()
    flow.wait_for(written, timeout=120)
    flow.stop()


def test_b_backend_down_during_writing_and_rotation_then_back(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    writer = Writer(logs, "down", rate=4000, rotate_every=0.7)
    writer.start()
    time.sleep(0.5)
    proxy.set("reset")
    wait_for(lambda: spooled_bytes(flow) > 100_000, 30, "documents to be spooled")
    time.sleep(1.0)
    wait_for(lambda: "CouchDB not reachable" in agent_status(flow)[1], 10, "status to say so")
    assert agent_status(flow)[0] == 1
    proxy.set("pass")
    written = writer.stop()
    flow.wait_for(written, timeout=120)
    wait_for(lambda: spooled_bytes(flow) == 0, 30, "the spool to drain")
    flow.stop()


def test_c_backend_flapping(tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str,
                            database: str, proxy: FaultProxy) -> None:
    proxy.max_body = 40_000
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    proxy.set("flap")
    writer = Writer(logs, "flap", rate=3000, rotate_every=1.5)
    writer.start()
    time.sleep(6)
    written = writer.stop()
    assert proxy.faults > 10
    proxy.set("pass")
    flow.wait_for(written, timeout=120)
    flow.stop()
    assert '"batch_split"' in flow.agent.log()


def test_sends_in_flight_stay_bounded_and_settle_exactly_through_faults(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    """Several batches in flight at once (shipping.concurrency), some failing while others
    succeed: every line still lands exactly once, and no more requests than allowed overlap."""
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    shipping={"batch_max_docs": 200, "concurrency": 4})
    proxy.delay = 0.2
    proxy.set("slow")
    written = append(logs / "app.log", numbered("fly", 0, 20_000))
    flow.start()
    wait_for(lambda: proxy.requests >= 20, 60, "requests to overlap")
    proxy.set("flap")
    time.sleep(3)
    proxy.set("pass")
    flow.wait_for(written, timeout=120)
    flow.stop()
    assert proxy.most_in_flight == 4
    assert proxy.faults > 0


def test_d_spool_cap_reached_pauses_reading_and_loses_nothing(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    cap = 256 * 1024
    proxy.set("reset")
    written = append(logs / "app.log", numbered("capped", 0, 40000))
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    spool={"max_bytes": cap, "segment_bytes": 64 * 1024},
                    shipping={"queue_max_docs": 500}).start()
    wait_for(lambda: '"spool_full"' in flow.agent.log(), 30, "the spool to fill up")
    time.sleep(1)
    assert spooled_bytes(flow) <= cap
    wait_for(lambda: "spool full, reading paused" in agent_status(flow)[1], 10, "status to say so")
    assert agent_status(flow)[0] == 2  # CRITICAL
    snapshot = json.loads(agent_status(flow, "--json")[1])
    assert snapshot["databases"][database]["backpressure"] is True
    assert snapshot["sources"]["app"]["lag"] > 0
    proxy.set("pass")
    flow.wait_for(written, timeout=120)
    flow.stop()


def test_e_corrupted_spool_segments_and_state_file(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("reset")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    spool={"segment_bytes": 32 * 1024}).start()
    written = append(logs / "app.log", numbered("spooled", 0, 5000))
    wait_for(lambda: spooled_bytes(flow) > 200_000, 30, "documents to be spooled")
    flow.stop()
    segments = sorted((flow.config.parent / "state" / "spool").rglob("*.seg"))
    assert len(segments) >= 3
    middle = bytearray(segments[1].read_bytes())
    for at in range(100, len(middle), 997):
        middle[at] ^= 0x5A
    segments[1].write_bytes(bytes(middle))
    with segments[-1].open("r+b") as f:
        f.truncate(segments[-1].stat().st_size - 10)
    proxy.set("pass")
    flow.start()
    flow.wait_for(written)
    assert '"spool_lost_documents"' in flow.agent.log()
    flow.stop()

    written += append(logs / "app.log", numbered("after", 0, 1000))
    (flow.config.parent / "state" / "offsets.json").write_bytes(b'{"version": 1, "files": [tru')
    flow.start()
    flow.wait_for(written)
    assert '"state_file_corrupt"' in flow.agent.log()
    flow.stop()


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs when this machine lets us mount one (root); else skip."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_f_no_space_left_for_the_spool(tmp_path: Path, logs: Path, couch: CouchDB,
                                       couchdb_url: str, database: str, proxy: FaultProxy,
                                       tiny_filesystem: Path) -> None:
    proxy.set("reset")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    state_dir=str(tiny_filesystem / "state"),
                    spool={"segment_bytes": 64 * 1024}).start()
    written = append(logs / "app.log", numbered("nospace", 0, 30000))
    wait_for(lambda: '"spool_write_failed"' in flow.agent.log(), 30, "the disk to fill up")
    time.sleep(2)
    assert flow.agent.running(), "the agent must not exit on a full disk"
    assert "No space left on device" in flow.agent.log()
    proxy.set("pass")
    flow.wait_for(written, timeout=120)
    flow.stop()


def test_documents_couchdb_refuses_go_to_the_dead_letter_file(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    refuse_secrets(couch, database)
    lines = [f"{'secret' if n % 10 == 0 else 'public'} line {n}" for n in range(500)]
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    written = append(logs / "app.log", lines)
    public = Counter({k: v for k, v in written.items() if k.startswith("public")})
    flow.wait_for(public)
    dead = flow.config.parent / "state" / "dead-letter.jsonl"
    wait_for(lambda: dead.exists() and len(dead.read_text().splitlines()) == 50, 30,
             "50 dead letters")
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert {r["error"] for r in records} == {"forbidden"}
    assert {r["reason"] for r in records} == {"no secrets here"}
    assert sorted(r["doc"]["msg"] for r in records) == sorted(k for k in written if k[0] == "s")
    wait_for(lambda: "50 document(s) refused" in agent_status(flow)[1], 10, "status to say so")
    assert agent_status(flow)[0] == 2  # CRITICAL: refused within status.dead_letter_window
    flow.stop()
    flow.start()
    flow.wait_for(public)
    flow.stop()
    assert len(dead.read_text().splitlines()) == 50, "refused documents were sent again"


def test_refused_credentials_keep_the_data_and_say_so(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("401")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    written = append(logs / "app.log", numbered("refused", 0, 2000))
    wait_for(lambda: '"couchdb_refused"' in flow.agent.log(), 30, "the refusal to be reported")
    wait_for(lambda: "HTTP 401" in agent_status(flow)[1], 10, "status to say so")
    assert agent_status(flow)[0] == 1
    assert "check couchdb.username/password" in flow.agent.log()
    proxy.set("pass")
    flow.wait_for(written, timeout=90)
    flow.stop()


def test_fails_over_to_the_next_url_and_comes_back(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("reset")
    flow = failover_flow(proxy, tmp_path, couch, couchdb_url, database, logs, "1s").start()
    written = append(logs / "app.log", numbered("failover", 0, 1000))
    flow.wait_for(written)
    assert '"couchdb_failover"' in flow.agent.log()
    proxy.set("pass")
    requests = proxy.requests
    time.sleep(1.5)
    written += append(logs / "app.log", numbered("failback", 0, 1000))
    flow.wait_for(written)
    assert '"couchdb_failback"' in flow.agent.log() and proxy.requests > requests
    flow.stop()


def test_document_errors_are_retried_a_bounded_number_of_times_then_dead_lettered(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    """A per-document error that is neither final nor a conflict is retried with backoff while
    status says DEGRADED, then dead-lettered with its reason; the rest flows meanwhile."""
    proxy.set("doc_error")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    shipping={"retry_max_backoff": "2s"}).start()
    written: Counter[str] = Counter()
    degraded = False
    for wave in range(20):
        # A new poisoned document every wave keeps documents waiting for a retry.
        written += append(logs / "app.log", [*numbered(f"clean{wave}", 0, 20), f"poison {wave}"])
        if not degraded:
            code, out = agent_status(flow, "--json")
            degraded = code == 1 and json.loads(out)["databases"][database]["health"] == "retrying"
        time.sleep(0.3)
    wait_for(lambda: degraded or json.loads(agent_status(flow, "--json")[1])[
        "databases"][database]["health"] == "retrying", 10, "status to say documents are retried")
    poison = Counter({k: v for k, v in written.items() if k.startswith("poison")})
    dead = flow.config.parent / "state" / "dead-letter.jsonl"
    wait_for(lambda: dead.exists() and len(dead.read_text().splitlines()) == 20, 60,
             "20 dead letters")
    flow.wait_for(written - poison)
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert {r["error"] for r in records} == {"unknown_error"}
    assert Counter(r["doc"]["msg"] for r in records) == poison
    wait_for(lambda: agent_status(flow)[0] == 0 or "refused" in agent_status(flow)[1], 10,
             "the retries to end")
    requests = proxy.bulk_requests
    time.sleep(2)
    assert proxy.bulk_requests == requests, "documents are still being sent again"
    flow.stop()


def test_an_error_page_that_is_not_couchdb_is_a_failed_request_never_a_dead_letter(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("html400")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs).start()
    written = append(logs / "app.log", numbered("page", 0, 2000))
    wait_for(lambda: proxy.bulk_requests >= 5, 30, "several refused requests")
    proxy.set("pass")
    flow.wait_for(written, timeout=90)
    flow.stop()
    assert not (flow.config.parent / "state" / "dead-letter.jsonl").exists()
    assert '"couchdb_unexpected_answer"' in flow.agent.log()


def test_a_database_missing_right_after_its_creation_is_retried_with_backoff(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("404")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    shipping={"retry_max_backoff": "2s"}).start()
    written = append(logs / "app.log", numbered("missing", 0, 1000))
    wait_for(lambda: proxy.bulk_requests >= 2, 30, "the first refused request")
    before = proxy.bulk_requests
    time.sleep(3)
    # With backoff (0.1 s doubling to 2 s), a handful of attempts; without it, hundreds.
    assert proxy.bulk_requests - before < 40
    assert flow.agent.running()
    proxy.set("pass")
    flow.wait_for(written, timeout=90)
    flow.stop()


def test_a_refused_batch_goes_to_the_next_url_not_the_spool_and_fails_back_after_a_probe(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("reset")
    flow = failover_flow(proxy, tmp_path, couch, couchdb_url, database, logs, "500ms").start()
    written = append(logs / "app.log", numbered("first", 0, 1000))
    flow.wait_for(written)
    assert '"couchdb_failover"' in flow.agent.log()
    time.sleep(2)  # several failback probes, all failing
    written += append(logs / "app.log", numbered("second", 0, 1000))
    flow.wait_for(written)
    assert '"couchdb_failback"' not in flow.agent.log()
    assert proxy.bulk_requests <= 2, "batches were sent to the dead URL again"
    proxy.set("pass")
    wait_for(lambda: '"couchdb_failback"' in flow.agent.log(), 30, "the probe to fail back")
    requests = proxy.bulk_requests
    written += append(logs / "app.log", numbered("third", 0, 1000))
    flow.wait_for(written)
    assert proxy.bulk_requests > requests
    flow.stop()
    assert [e["spooled"] for e in events(flow, "shipper_progress")] == [0]


def test_an_unwritable_spool_folder_pauses_reading_and_never_crashes(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    proxy.set("reset")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    shipping={"queue_max_docs": 500})
    state = flow.config.parent / "state"
    state.mkdir()
    (state / "spool").write_bytes(b"a file where the spool folder should be")
    flow.start()
    written = append(logs / "app.log", numbered("nospool", 0, 5000))
    wait_for(lambda: "spool full, reading paused" in agent_status(flow)[1], 30, "status to say so")
    assert agent_status(flow)[0] == 2  # CRITICAL: reading is paused
    assert "spool:" in agent_status(flow)[1]
    assert flow.agent.running()
    # CouchDB comes back while the spool is still unusable: the documents in hand probe it.
    proxy.set("pass")
    flow.wait_for(written, timeout=90)
    flow.stop()


def test_a_spool_record_lost_while_running_is_read_again_from_the_log(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    """Damage found during replay: the offsets must never be settled past the lost lines, so
    that the next start reads them again from the log file."""
    proxy.set("reset")
    flow = flow_via(proxy, tmp_path, couch, couchdb_url, database, logs,
                    spool={"segment_bytes": 32 * 1024}).start()
    written = append(logs / "app.log", numbered("damaged", 0, 5000))
    wait_for(lambda: spooled_bytes(flow) > 200_000, 30, "documents to be spooled")
    time.sleep(1)
    segments = sorted((flow.config.parent / "state" / "spool").rglob("*.seg"))
    assert len(segments) >= 3
    with segments[1].open("r+b") as f:  # the agent replays the oldest first: not read yet
        data = bytearray(f.read())
        for at in range(100, len(data), 997):
            data[at] ^= 0x5A
        f.seek(0)
        f.write(bytes(data))
    proxy.set("pass")
    wait_for(lambda: spooled_bytes(flow) == 0, 60, "the spool to drain")
    wait_for(lambda: '"spool_record_corrupt"' in flow.agent.log(), 10, "the damage to be seen")
    time.sleep(3)  # ticks that would settle the offsets past the lost lines
    flow.stop()
    flow.start()
    flow.wait_for(written)
    assert '"spool_lost_documents"' in flow.agent.log()
    flow.stop()


def test_the_connection_pool_lets_every_database_have_its_sends_in_flight(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        proxy: FaultProxy) -> None:
    """Three databases, `concurrency: 3` each: nine requests at once must fit in the pool."""
    others = [f"{database}_{n}" for n in (1, 2)]
    for name in others:
        couch.create_db(name)
    try:
        sources = [{"name": f"s{n}", "paths": [str(logs / f"s{n}.log")], "database": db}
                   for n, db in enumerate([database, *others])]
        flow = Pipeline(tmp_path, couch, through(proxy, couchdb_url), database, sources,
                        shipping={"batch_max_docs": 50, "concurrency": 3})
        proxy.delay = 0.3
        proxy.set("slow")
        written = [append(logs / f"s{n}.log", numbered(f"pool{n}", 0, 3000)) for n in range(3)]
        flow.start()
        wait_for(lambda: proxy.most_in_flight >= 9 or proxy.requests >= 150, 120,
                 "requests to overlap")
        proxy.set("pass")
        flow.wait_for(written[0], timeout=120)
        for name, expected in zip(others, written[1:], strict=True):
            def arrived(n: str = name) -> bool:
                return couch.count(n) >= 3000

            wait_for(arrived, 60, f"documents in {name}")
            assert Counter(str(d["msg"]) for d in couch.docs(name)) == expected
        flow.stop()
        assert proxy.most_in_flight == 9
    finally:
        for name in others:
            couch.delete_db(name)
