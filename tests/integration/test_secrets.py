"""Issue 9 "done when": a password made of every URL-special character never shows up in what
`agent check`, `agent run` (refused, and failing over from a dead URL), `agent status` and
`agent status --json` print, in the agent's JSON log, or in anything it writes to state_dir."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from backend.pouchdb_server import free_port
from tests.agentproc import AgentProcess, wait_for, write_config

pytestmark = pytest.mark.integration

# Never the server's real password, so every request is refused (401 on pouchdb-server and CouchDB 3).
PASSWORD = "W#r/o?n@g:p%zz s&=+;,[]!$'()*~^|\"<>{}\\`x"


def secret_forms(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return {"password": PASSWORD, "url-encoded": quote(PASSWORD, safe=""),
            "url-encoded (safe /)": quote(PASSWORD), "Authorization": token,
            "password tail": PASSWORD[-12:]}


def agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{user}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def everything_written(folder: Path) -> str:
    """Every file under `folder` (config files excepted), as text."""
    return "\n".join(p.read_bytes().decode(errors="replace") for p in sorted(folder.rglob("*"))
                     if p.is_file() and p.suffix != ".yaml" and p.name != "password")


SETUPS: dict[str, Callable[[Path, str, str], dict[str, Any]]] = {
    # the password written raw in the URL (`%zz` is no escape, so it stays as written)
    "raw in the url": lambda root, url, user: {"couchdb": {"url": with_user(url, user, PASSWORD)}},
    "percent-encoded in the url, failing over from a dead url": lambda root, url, user: {
        "couchdb": {"url": [with_user(f"http://127.0.0.1:{free_port()}", user, quote(PASSWORD, safe="")),
                            with_user(url, user, quote(PASSWORD, safe=""))],
                    "request_timeout": "1s", "failback_after": "1s"}},
    "password_file, failing over": lambda root, url, user: {
        "couchdb": {"url": [f"http://127.0.0.1:{free_port()}", url], "username": user,
                    "password_file": str(root / "password"), "request_timeout": "1s"}},
    "couchdb.password": lambda root, url, user: {
        "couchdb": {"url": url, "username": user, "password": PASSWORD}},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_no_output_log_or_state_file_holds_the_password(tmp_path: Path, couchdb_url: str, setup: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COUCHLOG_PASSWORD", raising=False)
    parts = urlsplit(couchdb_url)
    user = parts.username or "couchlog_writer"
    public = f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}".rstrip("/")
    (tmp_path / "logs").mkdir()
    log_file = tmp_path / "logs" / "app.log"
    log_file.write_text("".join(f"line {n}\n" for n in range(20)))
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "password").chmod(0o600)
    main = SETUPS[setup](tmp_path, public, user)
    config = write_config(tmp_path / "etc", main["couchdb"].pop("url"),
                          [{"name": "app", "paths": [str(log_file)], "schema": "$msg...",
                            "database": "log_secrets_test"}], **main)
    # Inline, the password is in a file every user can read: check and run warn, without it.
    config.chmod(0o644 if setup == "couchdb.password" else 0o600)
    printed = []

    check = agent(config, "check")
    printed += [check.stdout, check.stderr]
    assert_no_secret(user, printed)
    assert check.returncode == 0, check.stderr

    with AgentProcess(config) as running:
        running.wait_started()
        wait_for(lambda: '"couchdb_refused"' in running.log(), 60, "CouchDB to refuse the password")
        if "failing over" in setup:
            wait_for(lambda: '"couchdb_failover"' in running.log(), 30, "the failover")
        wait_for(lambda: "401" in agent(config, "status").stdout
                 or "403" in agent(config, "status").stdout, 30, "status to report the refusal")
        for args in (("status",), ("status", "--json")):
            result = agent(config, *args)
            assert result.returncode == 1 and result.stdout, result
            printed += [result.stdout, result.stderr]
        assert running.stop() == 0
        printed.append(running.log())
    assert '"couchdb_refused"' in printed[-1] and '"agent_started"' in printed[-1]
    printed.append(everything_written(tmp_path / "etc"))
    assert_no_secret(user, printed)
    assert f"as {user} (password from " in check.stdout
    warned = setup == "couchdb.password"
    assert ("agent: config warning: " in check.stderr) == warned, check.stderr
    assert ('"config_warning"' in printed[-2]) == warned


def assert_no_secret(user: str, printed: list[str]) -> None:
    text = "\n".join(printed)
    for name, form in secret_forms(user).items():
        assert form not in text, f"the {name} form of the password was printed or written"
