"""The two shippers on one job, and the sink they ship to: the parts every benchmark shares.

The job (issue 5's workload): follow fail2ban logs, keep NOTICE+Ban lines, split them with
the seed's token schema, add machine=server, POST `_bulk_docs` batches. The agent runs with
its defaults; syslog-ng (Debian's syslog-ng-core + syslog-ng-mod-http) runs in the foreground
with flow control and batches of 1000, as the issue asks.

The sink is Debian's nginx with an njs handler (bench/sink/) that parses each batch and
answers as CouchDB does, one result per document. It logs the time and document count of
every request, and optionally every request body, so a run can be checked document by
document (`expected_documents` against `Sink.documents`).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
SINK = ROOT / "bench" / "sink"
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import free_port  # noqa: E402
from bench.fail2ban_log import SEED_SCHEMA, seed_keeps  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402

PACKAGES = {"nginx": "/usr/sbin/nginx",
            "libnginx-mod-http-js": "/usr/lib/nginx/modules/ngx_http_js_module.so",
            "syslog-ng-core": "/usr/sbin/syslog-ng",
            "syslog-ng-mod-http": "/usr/lib/syslog-ng/3.38/libhttp.so"}
DATABASE = "log_bench"
SEED_REGEX = re.compile(r"^(?P<date>\S+)\s+(?P<hour>\S+)\s+\S+\s+\S+\s+\S+\s+\[(?P<process>\S+?)\]"
                        r"(?!\S)\s+\S+\s+(?P<ip>\S+)")
"""The seed schema as a regex written out by hand, so the check does not trust the agent's."""


def install() -> None:
    missing = [name for name, path in PACKAGES.items() if not Path(path).exists()]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"install these Debian packages first: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def expected_documents(paths: Iterable[Path]) -> Counter[bytes]:
    """The documents the job must deliver for these files, without `_id` and metadata."""
    docs: Counter[bytes] = Counter()
    for path in paths:
        with path.open(encoding="utf-8") as log:
            for line in log:
                text = line.rstrip("\n")
                if not seed_keeps(text):
                    continue
                match = SEED_REGEX.match(text)
                fields = match.groupdict() if match else {"message": text}
                docs[orjson.dumps({**fields, "machine": "server"}, option=orjson.OPT_SORT_KEYS)] += 1
    return docs


def canonical(doc: dict[str, Any]) -> bytes:
    doc.pop("_id", None)
    doc.pop("agent", None)
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


class Sink:
    """nginx + njs on a free port, counting (and, with `bodies`, keeping) what it is sent."""

    def __init__(self, folder: Path, bodies: bool) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True)
        keep = f"access_log {folder}/bodies.log bodies buffer=1m flush=100ms;" if bodies else ""
        conf = (SINK / "nginx.conf.in").read_text().replace("@DIR@", str(folder)).replace(
            "@SINK@", str(SINK)).replace("@PORT@", str(self.port)).replace("@BODIES@", keep)
        (folder / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen(["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)],
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nginx did not start; see {folder / 'error.log'}") from None
                time.sleep(0.05)
        self._read = 0
        self._received = 0
        self._last = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> tuple[int, float]:
        """Documents received so far, and when the last request was answered (epoch seconds)."""
        log = self.folder / "docs.log"
        if log.exists():
            with log.open("rb") as f:
                f.seek(self._read)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._read += len(complete)
            for line in complete.splitlines():
                stamp, count = line.split()
                self._received += int(count)
                self._last = max(self._last, float(stamp))
        return self._received, self._last

    def documents(self) -> Iterator[tuple[float, dict[str, Any]]]:
        """Every document received, with the time its request was answered."""
        with (self.folder / "bodies.log").open("rb") as log:
            for line in log:
                stamp, _, body = line.partition(b" ")
                answered = float(stamp)
                for doc in orjson.loads(body)["docs"]:
                    yield answered, doc

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass(frozen=True, slots=True)
class Peer:
    """How to start one shipper on a set of log files (a glob) into a sink."""

    name: str
    start: Callable[[str, str, Path], subprocess.Popen[bytes]]
    """(glob of the logs, sink URL, work folder) -> the running process."""

    @property
    def slug(self) -> str:
        """The name as a folder name (nginx's configuration cannot quote a path)."""
        return self.name.split()[0]


def start_agent(glob: str, url: str, work: Path) -> subprocess.Popen[bytes]:
    (work / "conf.d").mkdir(parents=True)
    (work / "agent.yaml").write_text(yaml.safe_dump({
        "couchdb": {"url": url}, "state_dir": str(work / "state"), "log": {"level": "warning"}}))
    (work / "conf.d" / "fail2ban.yaml").write_text(yaml.safe_dump({
        "name": "fail2ban", "database": DATABASE, "paths": [glob], "include": ["NOTICE", "Ban"],
        "schema": SEED_SCHEMA, "fields": {"machine": "server"}}))
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(work / "agent.yaml")],
                            cwd=ROOT, stderr=(work / "agent.log").open("wb"))


def start_syslog_ng(glob: str, url: str, work: Path) -> subprocess.Popen[bytes]:
    work.mkdir(parents=True)
    folder, pattern = os.path.split(glob)
    options = 'flags(no-parse) log-iw-size(20000) log-fetch-limit(1000) log-msg-size(65536)'
    if "*" in pattern:
        source = (f'wildcard-file(base-dir("{folder}") filename-pattern("{pattern}") '
                  f'max-files(5000) follow-freq(1) {options});')
    else:
        source = f'file("{glob}" follow-freq(1) {options});'
    conf = (SINK / "syslog-ng.conf.in").read_text().replace("@SOURCE@", source).replace(
        "@URL@", f"{url}/{DATABASE}/_bulk_docs")
    (work / "syslog-ng.conf").write_text(conf)
    return subprocess.Popen(["syslog-ng", "-F", "-f", str(work / "syslog-ng.conf"),
                             "-R", str(work / "persist"), "-p", str(work / "pid"),
                             "-c", str(work / "ctl"), "--no-caps"],
                            stdout=subprocess.DEVNULL, stderr=(work / "syslog-ng.log").open("wb"))


PEERS = (Peer("agent", start_agent), Peer("syslog-ng 3.38", start_syslog_ng))


def wait_received(sink: Sink, process: subprocess.Popen[bytes], expected: int,
                  timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while sink.received()[0] < expected:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{process.args[0]!r} stopped short: {sink.received()[0]} of "
                             f"{expected} documents")
        time.sleep(0.05)


def settle(sink: Sink, expected: int) -> None:
    """A second more for documents that should not come; then the count must be exact."""
    time.sleep(1.0)
    received = sink.received()[0]
    if received != expected:
        raise SystemExit(f"{received} documents received for {expected} expected")


def verify(sink: Sink, expected: Counter[bytes]) -> None:
    """Every expected document arrived exactly once (as a multiset, ids aside)."""
    got = Counter(canonical(doc) for _, doc in sink.documents())
    if got != expected:
        missing, extra = expected - got, got - expected
        raise SystemExit(f"documents differ: {sum(missing.values())} missing, "
                         f"{sum(extra.values())} extra (first: {next(iter(missing or extra))!r})")


@dataclass(frozen=True, slots=True)
class Usage:
    wall: float
    cpu: float
    peak_rss: float


def ship(peer: Peer, glob: str, expected: Counter[bytes] | int, work: Path) -> Usage:
    """Run `peer` on the logs until the sink has every document; check them; stop it."""
    count = expected if isinstance(expected, int) else sum(expected.values())
    sink = Sink(work / "sink", bodies=not isinstance(expected, int))
    try:
        started = time.time()
        process = peer.start(glob, sink.url, work / "peer")
        try:
            wait_received(sink, process, count)
            cpu, rss = cpu_seconds(process.pid), memory_mib(process.pid)["VmHWM"]
            last = sink.received()[1]
            settle(sink, count)
        finally:
            process.terminate()
            process.wait(60)
        if not isinstance(expected, int):
            verify(sink, expected)
        return Usage(last - started, cpu, rss)
    finally:
        sink.stop()
