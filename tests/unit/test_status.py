"""`agent status` never tracebacks and never misleads: a snapshot it cannot trust is UNKNOWN
(exit 3) with what was found; it needs only state_dir (no password); the snapshot is 0640."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cli
from agent.status import EXIT_OK, EXIT_UNKNOWN, StatusFile, mismatch, render
from tests.agentproc import write_config
from tests.unit.snapshots import JSON, damage, paths
from tests.unit.test_watcher_status import snapshot


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, "http://127.0.0.1:9",
                        [{"name": "app", "paths": [str(tmp_path / "x.log")], "schema": "$msg...",
                          "database": "log_app"}])


def status(config: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> tuple[str, int]:
    (config.parent / "state").mkdir(exist_ok=True)
    (config.parent / "state" / "status.json").write_bytes(content)
    code = cli.main(["status", "-c", str(config)])
    return capsys.readouterr().out, code


def future(seconds: float) -> dict[str, Any]:
    s = snapshot()
    s["updated_at"] = time.time() + seconds
    return s


@pytest.mark.parametrize(("content", "found"), [
    (b"{}", "has no pid"),
    (b"[1, 2]", "the snapshot is [1, 2], expected an object"),
    (b'"ok"', 'the snapshot is "ok", expected an object'),
    (b"null", "holds null"),
    (b"\x00\xffgarbage{", "is not JSON"),
    (b"", "is not JSON"),
    (orjson.dumps({**snapshot(), "pid": "1"}), 'pid is "1", expected a process id'),
    (orjson.dumps({**snapshot(), "pid": -1}), "pid is -1, expected a process id"),
    (orjson.dumps({**snapshot(), "updated_at": "now"}), 'updated_at is "now", expected a Unix time'),
    (orjson.dumps({**snapshot(), "sources": []}), "sources is [], expected an object"),
    (orjson.dumps(snapshot(healthy="yes")), 'databases.log_app.healthy is "yes", expected true'),
    (orjson.dumps(snapshot(spool={})), "has no databases.log_app.spool.dropped_records"),
    # Times relative to when the test runs, not to when it was collected.
    (lambda: orjson.dumps(future(3600)), "was updated 60m in the future by the live pid"),
    (lambda: orjson.dumps(future(-600)), "has the last status 10m ago, yet pid"),
])
def test_a_snapshot_that_cannot_be_trusted_is_unknown_and_says_what_was_found(
        config: Path, capsys: pytest.CaptureFixture[str], content: bytes | Callable[[], bytes],
        found: str) -> None:
    out, code = status(config, capsys, content if isinstance(content, bytes) else content())
    assert code == EXIT_UNKNOWN, out
    assert out.startswith("COUCHLOG UNKNOWN - the status file ") and found in out, out


def test_a_healthy_snapshot_is_still_ok(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, code = status(config, capsys, orjson.dumps(future(1)))  # within the clock's slack
    assert code == EXIT_OK and "health: OK" in out


def test_status_json_prints_the_raw_snapshot(config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (config.parent / "state").mkdir()
    StatusFile(config.parent / "state").write(snapshot())
    assert cli.main(["status", "--json", "-c", str(config)]) == EXIT_OK
    assert orjson.loads(capsys.readouterr().out)["databases"]["log_app"]["stored"] == 5


def test_the_snapshot_is_written_0640(tmp_path: Path) -> None:
    os.umask(old := os.umask(0))  # read the umask without changing it
    status_file = StatusFile(tmp_path)
    assert status_file.write(snapshot())
    assert stat.S_IMODE(status_file.path.stat().st_mode) == 0o640 & ~old == 0o640


PLACES = list(paths(snapshot()))[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON)
def test_render_survives_any_json_value(value: Any) -> None:
    text, code = render(value, Path("/s/status.json"))
    assert isinstance(text, str) and code == EXIT_UNKNOWN


@settings(max_examples=300, deadline=None)
@given(place=st.sampled_from(PLACES), value=JSON | st.just(KeyError), now=st.floats(0, 1e11))
def test_render_survives_any_part_of_a_snapshot_replaced(place: tuple[Any, ...], value: Any,
                                                         now: float) -> None:
    damaged = damage(snapshot(), place, value)
    text, code = render(damaged, Path("/s/status.json"), now=now)
    assert isinstance(text, str) and code in (0, 1, 2, 3)
    if mismatch(damaged) is not None:
        assert code == EXIT_UNKNOWN and "is not a status snapshot" in text


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder an unprivileged user can traverse (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="couchlog-status-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_status_needs_no_password_and_works_for_an_operator_in_the_agents_group(
        shared_folder: Path) -> None:
    """The password file is root's, 0600; `agent status` runs as nobody, who is in the state
    folder's group (setgid, so the 0640 snapshot gets that group) and reads only that."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run status as another user")
    nobody = 65534
    as_nobody = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
    if subprocess.run([*as_nobody, sys.executable, "-c", "import agent.status"],
                      capture_output=True, check=False, cwd=shared_folder).returncode:
        pytest.skip("the agent's code is not readable by nobody here (a checkout under /root?)")
    password = shared_folder / "password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = write_config(shared_folder, "http://127.0.0.1:9",
                          [{"name": "app", "paths": [str(shared_folder / "x.log")],
                            "schema": "$msg...", "database": "log_app"}],
                          couchdb={"username": "agent", "password_file": str(password)})
    state = shared_folder / "state"
    state.mkdir()
    os.chown(state, 0, nobody)
    state.chmod(0o2750)
    assert StatusFile(state).write(snapshot())
    done = subprocess.run([*as_nobody, sys.executable, "-m", "agent", "status", "-c", str(config)],
                          capture_output=True, text=True, check=False, cwd=shared_folder)
    assert (done.returncode, done.stderr) == (EXIT_OK, ""), done.stdout
    assert "health: OK" in done.stdout and "s3cret" not in done.stdout
    # The same user cannot read the password: status really did without it.
    assert subprocess.run([*as_nobody, "cat", str(password)], capture_output=True,
                          check=False).returncode


def test_a_snapshot_of_a_dead_pid_is_not_running() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    gone = {**snapshot(), "pid": child.pid}
    text, code = render(gone, Path("/s/status.json"))
    assert code == EXIT_UNKNOWN and text.startswith(
        f"COUCHLOG UNKNOWN - not running: last status 0s ago from pid {child.pid}")
