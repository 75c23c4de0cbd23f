"""The `agent` command: run, check, parse. A thin layer over the modules; no pipeline logic here.

Exit codes: 0 success, 1 a runtime failure, 2 a configuration or usage
error (with the file and key path), 3 the daemon could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, get_args

import orjson
import structlog

from agent import config as config_module
from agent.config import DEFAULT_CONFIG_PATH, ConfigError, LogLevel, Problem, SourceConfig
from agent.counters import SourceCounters
from agent.lines import LineSplitter
from agent.parser import SourceParser
from agent.types import Lines

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3
READ_SIZE = 64 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"agent: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # `agent parse ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent", description="couchlog agent: ships log "
                                     "lines to CouchDB as JSON documents, exactly once.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", type=Path, default=None,
                         help=f"main config file (default {DEFAULT_CONFIG_PATH})")
        return sub

    run = command("run", "follow the configured log files and ship them (the daemon)")
    run.add_argument("--log-level", choices=get_args(LogLevel))
    run.set_defaults(handler=_run)

    check = command("check", "validate the configuration and print one line per source")
    check.add_argument("--keys", action="store_true", help="print every configuration key")
    check.add_argument("--markdown", action="store_true", help="with --keys: as markdown tables")
    check.set_defaults(handler=_check)

    status = command("status", "say whether the agent is healthy and how far behind it is "
                     "(exit 0 healthy, 1 degraded, 3 not running)")
    status.add_argument("--json", action="store_true", help="print the raw snapshot")
    status.set_defaults(handler=_status)

    parse = command("parse", "parse lines from files or stdin and print one JSON document "
                    "per kept line; a summary goes to stderr")
    parse.add_argument("files", nargs="*", metavar="FILE", help="input files (default stdin)")
    parse.add_argument("--source", help="use this source from the config (-c)")
    style = parse.add_mutually_exclusive_group()
    style.add_argument("--schema", help="token schema, e.g. '$date $hour _ \\[$process\\] $ip'")
    style.add_argument("--regex", help="regex with named groups")
    style.add_argument("--json", action="store_true", help="lines are JSON objects")
    parse.add_argument("--fields", action="append", default=[], metavar="K=V[,K=V]",
                       help="static fields added to every document")
    parse.add_argument("--include", action="append", default=[], metavar="REGEX",
                       help="keep only lines matching this (repeatable: all must match)")
    parse.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="drop lines matching this (repeatable)")
    parse.add_argument("--drop-unmatched", action="store_true",
                       help="drop lines that do not parse instead of printing them raw")
    parse.set_defaults(handler=_parse)
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else DEFAULT_CONFIG_PATH


def _run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.daemon import Agent

    config = config_module.load(_config_path(args))
    logs.configure(args.log_level or config.log_level, config.log_format)
    log = structlog.get_logger("agent")
    for warning in config.warnings:
        log.warning("config_warning", file=str(warning.file), key=warning.key, message=warning.message)
    agent = Agent(config)
    try:
        asyncio.run(agent.run())
    except OSError as exc:
        log.error("agent_failed", error=str(exc), started=agent.started,
                  action="check that state_dir is writable and the paths are readable")
        return EXIT_FAILURE if agent.started else EXIT_STARTUP
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from agent.status import StatusFile, report, state_dir_of

    status_file = StatusFile(state_dir_of(_config_path(args)))
    reading = status_file.read()
    text, code = report(reading, status_file.path)
    if args.json and isinstance(reading.value, dict):
        try:
            raw = orjson.dumps(reading.value, option=orjson.OPT_INDENT_2) + b"\n"
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: no snapshot anyway
            print(text)
        else:
            sys.stdout.buffer.write(raw)
    else:
        print(text)
    return code


def _check(args: argparse.Namespace) -> int:
    if args.keys:
        print(config_module.describe_keys(markdown=args.markdown), end="")
        return EXIT_OK
    config = config_module.load(_config_path(args))
    unsafe = config_module.globs_reaching(config)
    if unsafe:
        raise ConfigError(unsafe)
    for warning in config.warnings:
        print(f"agent: config warning: {warning}", file=sys.stderr)
    for source in config.sources:
        files = {p for pattern in source.paths for p in config_module.expand_glob(pattern)}
        parser: str = source.format
        if source.pattern is not None:
            parser += f" ({len(source.pattern.groupindex)} fields)"
        print(f"{source.name}: {parser}, include {len(source.include)}, exclude "
              f"{len(source.exclude)}, {len(source.fields)} static fields -> {source.database}; "
              f"{len(source.paths)} glob(s), {len(files)} file(s) now  [{source.file}]")
    # The URLs carry no credentials (config took them off); redact anyway, as a second guard.
    couchdb = config.couchdb
    urls = ", ".join(config_module.redact_url(u) for u in couchdb.urls)
    user = f" as {couchdb.username}" if couchdb.username else ""
    secret = f" (password from {couchdb.password_from})" if couchdb.password_from else ""
    print(f"ok: {len(config.sources)} source(s), CouchDB {urls}{user}{secret}, "
          f"state in {config.state_dir}")
    return EXIT_OK


def _parse(args: argparse.Namespace) -> int:
    source = _parse_source(args)
    counters = SourceCounters()
    parser = SourceParser(source, host="", counters=counters)
    out = sys.stdout.buffer
    status = EXIT_OK
    inputs = args.files or ["-"]
    for name in inputs:
        try:
            for chunk in _chunks_of_lines(name, source.max_line_bytes):
                out.write(_render(parser, chunk))
                # Print as input arrives, so `tail -f log | agent parse ...` shows each line.
                out.flush()
        except OSError as exc:
            print(f"agent parse: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
            status = EXIT_FAILURE
    out.flush()
    c = counters
    kept = c.matched + c.unmatched - c.dropped_unmatched
    print(f"agent parse: {c.lines} lines read, {kept} kept, {c.filtered + c.empty} filtered "
          f"({c.empty} empty), {c.unmatched} not matched"
          f"{' (dropped)' if source.on_parse_error == 'drop' else ' (kept raw)'}, "
          f"{c.invalid_encoding} invalid UTF-8, {c.truncated} truncated", file=sys.stderr)
    return status


def _parse_source(args: argparse.Namespace) -> SourceConfig:
    problems: list[Problem] = []
    if args.source is not None:
        config = config_module.load(_config_path(args), need_secret=False)
        for source in config.sources:
            if source.name == args.source:
                return source
        names = ", ".join(s.name for s in config.sources)
        raise ConfigError([Problem(config.sources_dir, "--source",
                                   f"no source named {args.source!r} (sources: {names})")])
    fields: dict[str, str] = {}
    for item in (part for value in args.fields for part in value.split(",") if part):
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(Problem("agent parse", "--fields", f"expected NAME=VALUE, got {item!r}"))
        fields[key.strip()] = value
    data: dict[str, Any] = {"name": "parse", "paths": ["-"], "fields": fields,
                            "include": args.include, "exclude": args.exclude,
                            "on_parse_error": "drop" if args.drop_unmatched else "ship"}
    if args.schema is not None:
        data["schema"] = args.schema
    elif args.regex is not None:
        data["regex"] = args.regex
    elif args.json:
        data["format"] = "json"
    else:
        problems.append(Problem("agent parse", "--schema", "give --schema, --regex, --json, "
                                "or -c PATH --source NAME"))
    parsed = config_module.source_from_mapping("agent parse", data, problems)
    if problems or parsed is None:
        raise ConfigError(problems)
    return parsed


def _render(parser: SourceParser, lines: Lines) -> bytes:
    """One JSON object per kept line: its fields, and the parse error if it did not parse."""
    meta_key, dumps = parser.source.metadata_key, orjson.dumps
    out = []
    for _, fields, error in parser.kept(lines):
        if error is not None:
            fields[meta_key] = {"parse_error": error}
        out.append(dumps(fields))
    return b"\n".join(out) + b"\n" if out else b""


def _chunks_of_lines(name: str, max_line_bytes: int) -> Iterator[Lines]:
    """Lines of a file or stdin, a chunk at a time as they arrive; the last needs no newline."""
    splitter = LineSplitter(max_line_bytes)
    stream: BinaryIO
    if name == "-":
        stream = sys.stdin.buffer
        close = False
    else:
        stream = open(name, "rb")  # noqa: SIM115 - closed below, after a streaming loop
        close = True
    try:
        read = getattr(stream, "read1", stream.read)
        while chunk := read(READ_SIZE):
            yield splitter.feed(chunk)
        last = splitter.flush()
        if last is not None:
            yield Lines.of([last])
    finally:
        if close:
            stream.close()


if __name__ == "__main__":
    sys.exit(main())
