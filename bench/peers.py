"""The agent against syslog-ng on the same job, into the same CouchDB-shaped sink.

The job (issue 5's workload): follow a generated 1M-line fail2ban log, keep NOTICE+Ban lines,
split them with the seed's token schema, add machine=server, POST `_bulk_docs` batches. The sink
is Debian's nginx with an njs handler (bench/sink/) that answers each batch as CouchDB does, one
result per document, and logs how many documents each request carried. syslog-ng (Debian's
syslog-ng-core + syslog-ng-mod-http) runs in the foreground with flow control. Per run: wall
seconds until the last document was received, CPU seconds, peak RSS; medians of interleaved
runs, and the agent/syslog-ng ratios. A run counts only if the sink received exactly the
expected number of documents, and no more arrived a second later.

    .venv/bin/python bench/peers.py [--lines 1000000] [--runs 5]

Needs root the first time (it installs the Debian packages if they are missing).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SINK = ROOT / "bench" / "sink"
sys.path.insert(0, str(ROOT))

from backend.pouchdb_server import free_port  # noqa: E402
from bench.fail2ban_log import SEED_SCHEMA  # noqa: E402
from bench.parse_speed import workload  # noqa: E402
from bench.procstat import cpu_seconds, memory_mib  # noqa: E402
from tests.agentproc import write_config  # noqa: E402

PACKAGES = {"nginx": "/usr/sbin/nginx",
            "libnginx-mod-http-js": "/usr/lib/nginx/modules/ngx_http_js_module.so",
            "syslog-ng-core": "/usr/sbin/syslog-ng",
            "syslog-ng-mod-http": "/usr/lib/syslog-ng/3.38/libhttp.so"}


def install() -> None:
    missing = [name for name, path in PACKAGES.items() if not Path(path).exists()]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"install these Debian packages first: {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


class Sink:
    """nginx + njs on a free port, counting the documents it is sent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True)
        conf = (SINK / "nginx.conf.in").read_text().replace("@DIR@", str(folder)).replace(
            "@SINK@", str(SINK)).replace("@PORT@", str(self.port))
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> tuple[int, float]:
        """Documents received so far, and when the last request came (epoch seconds)."""
        log = self.folder / "docs.log"
        if not log.exists():
            return 0, 0.0
        total, last = 0, 0.0
        for line in log.read_text().splitlines():
            stamp, count = line.split()
            total += int(count)
            last = max(last, float(stamp))
        return total, last

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


Starter = Callable[["Sink", Path], "subprocess.Popen[bytes]"]


def measure(start: Starter, work: Path, expected: int) -> tuple[float, float, float]:
    sink = Sink(work / "sink")
    try:
        started = time.time()
        process = start(sink, work)
        try:
            deadline = time.monotonic() + 600
            while sink.received()[0] < expected:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{process.args[0]} stopped short: {sink.received()[0]} of {expected}")
                time.sleep(0.05)
            cpu, rss = cpu_seconds(process.pid), memory_mib(process.pid)["VmHWM"]
            time.sleep(1.0)
            received, last = sink.received()
            if received != expected:
                raise SystemExit(f"{process.args[0]}: {received} documents for {expected} lines kept")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        return last - started, cpu, rss
    finally:
        sink.stop()


def start_agent(log: Path) -> Callable[[Sink, Path], subprocess.Popen[bytes]]:
    def start(sink: Sink, work: Path) -> subprocess.Popen[bytes]:
        config = write_config(work / "agent", sink.url, [{
            "name": "fail2ban", "database": "log_bench", "paths": [str(log)],
            "include": ["NOTICE", "Ban"], "schema": SEED_SCHEMA, "fields": {"machine": "server"}}],
            log={"level": "warning"}, scan_interval="10s", shipping={"linger": "200ms"})
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)])
    return start


def start_syslog_ng(log: Path) -> Callable[[Sink, Path], subprocess.Popen[bytes]]:
    def start(sink: Sink, work: Path) -> subprocess.Popen[bytes]:
        folder = work / "syslog-ng"
        folder.mkdir()
        conf = (SINK / "syslog-ng.conf.in").read_text().replace("@LOG@", str(log)).replace(
            "@URL@", f"{sink.url}/log_bench/_bulk_docs")
        (folder / "syslog-ng.conf").write_text(conf)
        return subprocess.Popen(["syslog-ng", "-F", "-f", str(folder / "syslog-ng.conf"),
                                 "-R", str(folder / "persist"), "-p", str(folder / "pid"),
                                 "-c", str(folder / "ctl"), "--no-caps"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    install()
    log = workload(args.lines)
    expected = sum(1 for line in log.open() if "NOTICE" in line and "Ban" in line)
    peers = {"agent": start_agent(log), "syslog-ng 3.38": start_syslog_ng(log)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in peers}
    for run in range(args.runs):
        for name, start in peers.items():
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(measure(start, Path(tmp), expected))
                wall, cpu, rss = results[name][-1]
                print(f"run {run + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss:.0f} MiB",
                      file=sys.stderr)
    print(f"workload: {args.lines} lines ({log.stat().st_size / 1e6:.0f} MB) -> {expected} documents, "
          f"each received exactly once by the sink; median of {args.runs} interleaved runs")
    print(f"{'':16} {'wall s':>7} {'CPU s':>7} {'peak RSS MiB':>13} {'lines/s':>10}")
    medians = {}
    for name, runs in results.items():
        medians[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
        wall, cpu, rss = medians[name]
        print(f"{name:16} {wall:7.2f} {cpu:7.2f} {rss:13.1f} {args.lines / wall:10,.0f}")
    agent, peer = medians["agent"], medians["syslog-ng 3.38"]
    print(f"agent/syslog-ng: wall {agent[0] / peer[0]:.2f}, CPU {agent[1] / peer[1]:.2f}, "
          f"RSS {agent[2] / peer[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
