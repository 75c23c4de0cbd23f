"""Under journald (JOURNAL_STREAM names stderr's device:inode) each log line starts with its
syslog priority, so `journalctl -p err` works; a file or a pipe keeps plain JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LOG_EVERY_LEVEL = """
import structlog
from agent import logs
logs.configure("debug", "json")
log = structlog.get_logger("t")
log.debug("at_debug")
log.info("at_info", n=1)
log.warning("at_warning")
log.error("at_error")
log.critical("at_critical")
"""


def run_with_stderr(stderr_file: Path, journal_stream: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with open(stderr_file, "wb") as stderr:
        subprocess.run([sys.executable, "-c", LOG_EVERY_LEVEL], stderr=stderr, env=env,
                       check=True, timeout=60)
    return stderr_file.read_text().splitlines()


def dev_ino(path: Path) -> str:
    found = path.stat()
    return f"{found.st_dev}:{found.st_ino}"


def test_a_journal_stream_gets_syslog_priorities(tmp_path: Path) -> None:
    stream = tmp_path / "journal"
    stream.touch()
    lines = run_with_stderr(stream, dev_ino(stream))
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"], lines
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == ["at_debug", "at_info", "at_warning", "at_error",
                                            "at_critical"]
    assert events[1]["n"] == 1


def test_a_file_or_pipe_keeps_plain_json(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.touch()
    for journal_stream in (None, dev_ino(other), "garbage"):
        lines = run_with_stderr(tmp_path / "plain.log", journal_stream)
        assert len(lines) == 5 and all(json.loads(line)["event"] for line in lines), lines
