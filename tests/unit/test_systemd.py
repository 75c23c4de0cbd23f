"""The unit file: `systemd-analyze verify` accepts it and `security --offline` rates it OK (<= 3.0).

The unit names /opt/couchlog/bin/agent (README's install path); verify checks that the binary
exists, so the test points it at this checkout's `agent` instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "couchlog-agent.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                "(scripts/setup installs Debian's systemd package as root)")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    agent = Path(sys.executable).with_name("agent")
    text = UNIT.read_text().replace("/opt/couchlog/bin/agent", str(agent))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_verifies(unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # verify also reports on unrelated units of this machine; only our unit's lines count.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_unit_security_rating_is_ok(unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 3.0, result.stdout


def test_unit_runs_as_dedicated_user_with_notify_and_watchdog() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["User"] == "couchlog" and "adm" in settings["SupplementaryGroups"]
    assert float(settings["WatchdogSec"]) > 0
    assert "HUP" in settings["ExecReload"]
    assert settings["StateDirectory"] == "couchlog"
