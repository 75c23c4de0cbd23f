"""Fixtures the integration suites share (the server and databases are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """An empty folder for the log files a test writes and the agent follows."""
    folder = tmp_path / "logs"
    folder.mkdir()
    return folder
