"""Every line the agent logs in JSON mode is JSON, whoever logged it."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from agent import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put logging back as it was after a test that configured it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_library_logging_and_warnings_are_json(restore_logging: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    # What watchdog's emitter thread logs when it is stopped while events arrive.
    logging.getLogger("watchdog.observers.inotify").error(
        "InotifyEmitter.queue_events() called when the thread is inactive")
    try:
        raise OSError(5, "Input/output error")
    except OSError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    logging.getLogger("aiohttp.client").debug("below the level: not printed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    structlog.get_logger("agent").info("agent_started", pid=1)
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["event"] == (
        "InotifyEmitter.queue_events() called when the thread is inactive")
    assert events[0]["level"] == "error" and events[0]["logger"] == "watchdog.observers.inotify"
    assert "Input/output error" in events[1]["exception"]
    assert "deprecation" in events[2]["event"]
    assert events[3]["event"] == "agent_started"
    assert len(events) == 4
