"""Start the CouchDB-compatible test server (pouchdb-server from npm) on a loopback port.

Used by the test suite's fixtures and by the demo; it stands in for Apache
CouchDB 3 where that cannot be installed (see shared/couchdb-test-backend.md).

    python backend/pouchdb_server.py --port 5984 --data DIR [--password PW]

runs it in the foreground until SIGTERM or Ctrl-C, printing the admin URL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BINARY = HERE / "node_modules" / ".bin" / "pouchdb-server"
ADMIN = "admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_answers(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback `port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_started(process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float,
                 what: str, log: Path) -> None:
    """Poll `ready` until it holds. If `process` exits first, or `timeout` seconds pass (then
    it is stopped), raise RuntimeError naming `what` and the end of its `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; {log} ends with:\n"
                               f"{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{what} did not start within {timeout}s; {log} ends with:\n{_tail(log)}")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate `process` if it still runs; kill it if it has not gone after 10 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError as exc:
        return f"(unreadable: {exc})"


class PouchDBServer:
    """A running pouchdb-server with one admin user; `url` carries the admin's credentials."""

    def __init__(self, data_dir: Path, port: int | None = None, password: str = "test-admin") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{ADMIN}:{self.password}@127.0.0.1:{self.port}"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} is missing: run 'npm ci --ignore-scripts' in {HERE}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "config.json"
        if not config.exists():
            config.write_text(json.dumps({"admins": {ADMIN: self.password}}))
        env = dict(os.environ, NODE_OPTIONS="--unhandled-rejections=warn")
        self.process = subprocess.Popen(
            [str(BINARY), "-p", str(self.port), "-o", "127.0.0.1", "-d", str(self.data_dir),
             "-c", str(config), "-n", "--no-color"],
            cwd=self.data_dir, env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "server.err", "ab"),  # noqa: SIM115 - owned by the child
        )
        wait_started(self.process, self._answers, timeout, "pouchdb-server",
                     self.data_dir / "server.err")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.public_url + "/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> PouchDBServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5984)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--password", default="test-admin")
    args = parser.parse_args()
    server = PouchDBServer(args.data.resolve(), args.port, args.password)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(server.url, flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
