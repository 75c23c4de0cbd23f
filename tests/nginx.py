"""Debian's nginx as a foreground child on loopback ports, with a throwaway CA, for front tests."""

from __future__ import annotations

import getpass
import http.client
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.pouchdb_server import free_port, port_answers, stop_process, wait_started

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate for localhost and 127.0.0.1, signed by it."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=couchlog test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")


class Nginx:
    """nginx running the rendered front (an http-level file) under its own prefix in `folder`."""

    def __init__(self, folder: Path, front_conf: Path) -> None:
        assert NGINX is not None
        self.folder = folder
        self.front_conf = front_conf
        self.process: subprocess.Popen[bytes] | None = None
        for sub in ("logs", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        temp = "\n".join(f"  {kind}_temp_path {folder}/tmp/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf = folder / "nginx.conf"
        self.conf.write_text(
            # Workers run as this user: under root they would be `nobody`, who cannot write the
            # temp folders pytest makes private.
            f"user {getpass.getuser()};\nworker_processes 1;\npid {folder}/nginx.pid;\n"
            f"error_log {folder}/logs/error.log warn;\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n  access_log {folder}/logs/access.log;\n"
            f"{temp}\n  include {front_conf};\n}}\n")

    def start(self, port: int, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [str(NGINX), "-p", str(self.folder), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "logs" / "stderr", "ab"))  # noqa: SIM115
        wait_started(self.process, lambda: port_answers(port), timeout, "nginx",
                     self.folder / "logs" / "stderr")

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class FrontClient:
    """Raw HTTPS requests: the path goes on the wire exactly as given (`//`, `%2F`, `..`)."""

    def __init__(self, port: int, ca: Path) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(ca))

    def request(self, method: str, path: str, body: bytes | str | None = None,
                auth: tuple[str, str] | None = None, https: bool = True,
                port: int | None = None, headers: dict[str, str] | None = None) -> Answer:
        import base64

        headers = {"Accept": "application/json", **(headers or {})}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{auth[0]}:{auth[1]}".encode()).decode()
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection("127.0.0.1", port or self.port, context=self.context,
                                               timeout=60)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            conn.close()


__all__ = ["NGINX", "Certificates", "FrontClient", "Nginx", "free_port", "make_certificates"]
