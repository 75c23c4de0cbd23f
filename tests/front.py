"""The nginx front in front of a test backend, for front and dashboard tests: `agent setup`
(roles, users, _security, validation, the shipped reports and the dashboard), then Debian's nginx
running the front rendered by `agent setup --nginx`, on loopback ports with a throwaway CA."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.agentproc import write_config
from tests.backendsetup import Account, account, backend_address, delete_users, run_agent
from tests.couch import CouchDB
from tests.nginx import FrontClient, Nginx, free_port, make_certificates


@dataclass(frozen=True)
class Front:
    db: str
    client: FrontClient
    http_port: int
    https_port: int
    ca: Path
    cert: Path
    agent: Account
    public: Account
    reader: Account
    folder: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


@contextmanager
def running_front(couchdb_url: str, couch: CouchDB, folder: Path, db: str,
                  max_body_size: str = "1m") -> Iterator[Front]:
    """`agent setup` for `db` on the backend at `couchdb_url` (admin URL), and nginx in front of
    it until the block ends; then the database and the users are deleted."""
    agent, public, reader = (account(folder / "secrets", p) for p in ("agent", "public", "reader"))
    certs = make_certificates(folder / "tls")
    http_port, https_port = free_port(), free_port()
    upstream, _ = backend_address(couchdb_url)
    config = write_config(folder / "setup", f"https://127.0.0.1:{https_port}",
                          [{"name": "app", "paths": [str(folder / "x.log")], "database": db,
                            "schema": "$msg..."}],
                          couchdb={"username": agent.name, "password": agent.password})
    try:
        done = run_agent("setup", "-c", str(config), "--url", couchdb_url,
                         "--public-user", public.name, "--public-password-file",
                         str(public.password_file), "--reader", reader.name,
                         "--reader-password-file", str(reader.password_file))
        assert done.returncode == 0, done.stderr
        conf = folder / "couchlog.conf"
        rendered = run_agent("setup", "--nginx", "--server-name", "localhost", "--cert",
                             str(certs.cert), "--key", str(certs.key), "--bind", "127.0.0.1",
                             "--http-port", str(http_port), "--https-port", str(https_port),
                             "--upstream", upstream, "--max-body-size", max_body_size,
                             "--public-user", public.name, "--public-password-file",
                             str(public.password_file), "-o", str(conf))
        assert rendered.returncode == 0, rendered.stderr
        nginx = Nginx(folder / "nginx", conf)
        nginx.start(https_port)
        try:
            yield Front(db, FrontClient(https_port, certs.ca), http_port, https_port, certs.ca,
                        certs.cert, agent, public, reader, folder)
        finally:
            nginx.stop()
    finally:
        couch.delete_db(db)
        delete_users(couch, agent.name, public.name, reader.name)


def spki_sha256(cert: Path) -> str:
    """base64 of the SHA-256 of the certificate's public key (SubjectPublicKeyInfo, DER): what
    Chromium's --ignore-certificate-errors-spki-list takes."""
    key = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=key, check=True,
                         capture_output=True).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
