"""Helpers for `agent setup` tests: run the command, make users with throwaway passwords."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.couch import CouchDB


def run_agent(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m agent ARGS` to completion, with its output captured."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("COUCHLOG_ADMIN_PASSWORD", None)
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          env=environment, timeout=timeout, check=False,
                          input=stdin.decode() if stdin is not None else None, text=True)


@dataclass(frozen=True)
class Account:
    name: str
    password: str
    password_file: Path


def account(folder: Path, prefix: str) -> Account:
    """A user name unique to this run (users are server-wide) and its password in a file."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.password"
    path.write_text(password + "\n")
    return Account(name, password, path)


def backend_address(couchdb_url: str) -> tuple[str, str]:
    """host:port of the test backend, and its URL without credentials."""
    parts = urlsplit(couchdb_url)
    return f"{parts.hostname}:{parts.port}", f"{parts.scheme}://{parts.hostname}:{parts.port}"


def delete_users(couch: CouchDB, *names: str) -> None:
    for name in names:
        path = f"/_users/org.couchdb.user:{name}"
        status, doc = couch.request("GET", path)
        if status == 200:
            couch.request("DELETE", f"{path}?rev={doc['_rev']}")
