"""Agent logging: structlog, one event per line, JSON in production and readable on a terminal.

Under systemd's journal (see `under_journald`) each line starts with its syslog priority
(`<3>` for an error), which journald strips and records, so `journalctl -p err` selects by
level; files and pipes get the lines without it.

The standard library's logging (watchdog, asyncio, aiohttp) and Python's
warnings go through the same renderer, so that every line of a JSON log is
JSON: a plain-text line from a library would break whoever parses the log.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
                   "critical": 2}
"""syslog(3) priorities of the log levels (`<N>` prefixes that journald reads)."""


def under_journald(stream: TextIO) -> bool:
    """True if `stream` is the journal stream systemd gave the service: JOURNAL_STREAM holds its
    `device:inode`. Inherited by a child whose stderr was redirected, the variable names another
    file, so a file or pipe keeps plain JSON lines."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{found.st_dev}:{found.st_ino}"


def journald_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """`renderer`, with each line prefixed by its syslog priority (`<3>` for an error), so that
    `journalctl -p err` selects by level; journald strips the prefix."""

    def render(logger: Any, method_name: str, event_dict: structlog.typing.EventDict) -> Any:
        level = str(event_dict.get("level", method_name)).lower()
        prefix = f"<{SYSLOG_PRIORITY.get(level, 6)}>"
        line = renderer(logger, method_name, event_dict)
        return prefix.encode() + line if isinstance(line, bytes) else prefix + str(line)

    return render


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Set up structlog once, from the CLI, before anything logs."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console else structlog.processors.JSONRenderer()
    )
    if under_journald(sys.stderr):
        renderer = journald_priority(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    # Replace, not add: configuring twice (tests run the CLI in-process) must not print twice.
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
