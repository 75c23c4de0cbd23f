"""The `agent` command: run, check, parse. A thin layer over the modules; no pipeline logic here.

Exit codes: 0 success, 1 a runtime failure, 2 a configuration or usage
error (with the file and key path), 3 the daemon could not start.

Each command's own module (the daemon, setup, send, report) is imported by its
handler, not here: `agent run` stays resident for months and need not carry the
others' code and libraries (a few MiB of the 64 MiB it may use).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import orjson
import structlog

from agent import config as config_module
from agent.config import DEFAULT_CONFIG_PATH, ConfigError, LogLevel, Problem, SourceConfig
from agent.counters import SourceCounters
from agent.globs import expand
from agent.lines import LineSplitter
from agent.parser import SourceParser
from agent.patterns import fallback_warnings
from agent.types import Lines

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3
RELOAD_WAIT = 30.0


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

    status = command("status", "say whether the agent is healthy and how far behind it is, as "
                     "a monitoring plugin (Nagios/Icinga): exit 0 OK, 1 WARNING, 2 CRITICAL, "
                     "3 UNKNOWN (not running, or no status to trust); thresholds are the "
                     "status.* config keys")
    status.add_argument("--json", action="store_true", help="print the raw snapshot")
    status.set_defaults(handler=_status)

    reload = command("reload", "make the running agent re-read its configuration (as SIGHUP "
                     "does) and say the outcome: exit 0 applied, 2 refused (the running "
                     "configuration goes on), 3 no agent running, 1 no answer in time")
    reload.add_argument("--wait", type=float, default=RELOAD_WAIT, metavar="SECONDS",
                        help=f"how long to wait for the outcome (default {RELOAD_WAIT:g})")
    reload.set_defaults(handler=_reload)

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

    setup = command("setup", "prepare CouchDB for couchlog (databases, users, roles, security, "
                    "settings), idempotently; or render the nginx front (--nginx)")
    _setup_arguments(setup)
    setup.set_defaults(handler=_setup)

    send = command("send", "send lines (JSON, or parsed by a source) to CouchDB once; exit 0 only "
                   "when every line is stored; a summary goes to stderr")
    _send_arguments(send)
    send.set_defaults(handler=_send)
    _report_arguments(command)
    return parser


def _setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="CouchDB URL (default: the first couchdb.url of the config)")
    parser.add_argument("--admin", default="admin", help="server admin's name (default admin)")
    parser.add_argument("--admin-password-file", type=Path, metavar="FILE",
                        help="file holding the admin's password (else $COUCHLOG_ADMIN_PASSWORD, "
                        "else a prompt on a terminal)")
    parser.add_argument("--ca-file", type=Path, metavar="FILE", help="CA certificate for https URLs")
    parser.add_argument("--db", action="append", default=[], metavar="NAME",
                        help="database to set up (repeatable; default: the sources' databases)")
    parser.add_argument("--shards", type=int, metavar="Q", help="shards of a new database (cluster)")
    parser.add_argument("--replicas", type=int, metavar="N",
                        help="copies of each shard of a new database (cluster)")
    parser.add_argument("--agent-user", help="an agent's user (default: couchdb.username of -c)")
    parser.add_argument("--agent-password-file", type=Path, metavar="FILE",
                        help="its password (default: the config's)")
    parser.add_argument("--public-user", default="couchlog_public",
                        help="the user whose credentials nginx injects for anonymous writes")
    parser.add_argument("--public-password-file", type=Path, metavar="FILE",
                        help="its password (needed to create it and to render --nginx)")
    parser.add_argument("--reader", default="couchlog_reader", help="a user who may read")
    parser.add_argument("--reader-password-file", type=Path, metavar="FILE",
                        help="its password (the reader is created only with it)")
    parser.add_argument("--js-engine", choices=["quickjs", "spidermonkey"], default="quickjs",
                        help="CouchDB 3.4+ JavaScript engine (default quickjs: views build ~20x "
                        "faster)")
    parser.add_argument("--dry-run", action="store_true", help="print what would change; change "
                        "nothing")
    parser.add_argument("--replicate-to", metavar="URL",
                        help="keep a continuous copy of every log database on this server")
    parser.add_argument("--replicate-password-file", type=Path, metavar="FILE",
                        help="password of the user in --replicate-to")
    parser.add_argument("--replication-status", action="store_true",
                        help="list the state of couchlog's replications and exit")
    nginx = parser.add_argument_group("the nginx front (--nginx renders it; nothing else is done)")
    nginx.add_argument("--nginx", action="store_true", help="render nginx's configuration")
    nginx.add_argument("--server-name", default="_", help="nginx server_name")
    nginx.add_argument("--cert", help="TLS certificate file (full chain)")
    nginx.add_argument("--key", help="TLS private key file")
    nginx.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here, not stdout")
    nginx.add_argument("--upstream", action="append", default=[], metavar="HOST:PORT",
                       help="CouchDB node behind nginx (repeatable; default: the --url's)")
    nginx.add_argument("--bind", default="", metavar="ADDRESS", help="address nginx listens on")
    nginx.add_argument("--http-port", type=int, default=80)
    nginx.add_argument("--https-port", type=int, default=443)
    nginx.add_argument("--max-body-size", default="16m", help="nginx client_max_body_size")
    nginx.add_argument("--template", type=Path, default=None, metavar="FILE",
                       help="the template (default: nginx/couchlog.conf.template of couchlog)")


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE", help="input files (default, or -: stdin)")
    parser.add_argument("--db", help="database (default: the source's, with --source)")
    parser.add_argument("--source", help="parse with this source of the config (-c); without it, "
                        "each line is a JSON object")
    parser.add_argument("--url", help="CouchDB or front URL, credentials allowed (default: the "
                        "config's first couchdb.url and its user)")
    parser.add_argument("--ca-file", type=Path, metavar="FILE", help="CA certificate for https")
    parser.add_argument("--batch-size", type=int, default=500, metavar="N",
                        help="documents per _bulk_docs request (default 500)")
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="attempts per batch after the first, with backoff (default 5)")
    parser.add_argument("--name", metavar="NAME", help="what names the input in the ids (default: "
                        "the file's absolute path; stdin is a new input on every run): the same "
                        "name and content give the same ids")
    parser.add_argument("--random-ids", action="store_true",
                        help="let CouchDB choose the ids (a rerun then stores every line again)")


def _setup(args: argparse.Namespace) -> int:
    from agent import report as report_module
    from agent import setup as setup_module

    path = _config_path(args)
    config = config_module.load(path) if args.config is not None or path.exists() else None
    # Every log database gets the shipped reports; the dashboard has a database of its own.
    return setup_module.command(args, config,
                                design_documents=list(report_module.design_documents().values()),
                                dashboard_documents=[report_module.dashboard_document()])


def _send(args: argparse.Namespace) -> int:
    from agent import send as send_module

    path = _config_path(args)
    config = config_module.load(path) if args.config is not None or path.exists() else None
    return send_module.command(args, config)


def _config_path(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else DEFAULT_CONFIG_PATH


def _run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.daemon import Agent
    from agent.supervisor import describe

    _cap_malloc_arenas()
    config = config_module.load(_config_path(args))
    logs.configure(args.log_level or config.log_level, config.log_format)
    log = structlog.get_logger("agent")
    for warning in config.warnings:
        log.warning("config_warning", file=str(warning.file), key=warning.key, message=warning.message)
    agent = Agent(config)
    try:
        asyncio.run(agent.run())
    except Exception as exc:
        # Errors leave the agent's TaskGroup wrapped in an ExceptionGroup: say each one, in
        # one line, never as a traceback.
        errors = _leaf_errors(exc)
        system = all(isinstance(e, OSError) for e in errors)
        log.error("agent_failed", error="; ".join(describe(e) for e in errors),
                  started=agent.started, state_dir=str(config.state_dir),
                  action=("check that state_dir exists and is writable by the agent's user, that "
                          "the log paths are readable and any listening port is free, then "
                          "start it again") if system else
                  "this is a bug in the agent: report it with this line; the offsets already "
                  "saved are kept, so a restart loses and doubles nothing",
                  exc_info=not system)
        return EXIT_FAILURE if agent.started else EXIT_STARTUP
    return EXIT_OK


def _cap_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at 2, unless MALLOC_ARENA_MAX says otherwise. Reads and
    fsyncs run in worker threads, and glibc gives each new thread an arena of its own (up to 8
    per core) that keeps its freed memory: about 8 MiB of the peak with 1,000 files. Done here,
    before any thread starts, so that it holds however the agent is started (systemd, a
    container, by hand, the benches). A plain call: no executable memory is made, which
    MemoryDenyWriteExecute=yes would refuse. Not glibc: nothing to do."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        m_arena_max = -8  # malloc.h
        mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(2))


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_errors(inner)]
    return [exc]


def _status(args: argparse.Namespace) -> int:
    from agent.status import StatusFile, last_dead_letter, report, settings_of, unknown

    try:
        state_dir, limits = settings_of(_config_path(args))
    except ConfigError as exc:
        # A monitoring plugin's 2 would read as CRITICAL: a config it cannot read is UNKNOWN.
        text, code = unknown("config error: " + "; ".join(str(p) for p in exc.problems))
        print(text)
        return code
    status_file = StatusFile(state_dir)
    reading = status_file.read()
    text, code = report(reading, status_file.path, limits=limits,
                        dead_letter_at=last_dead_letter(state_dir))
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


def _reload(args: argparse.Namespace) -> int:
    """Signal the pid the status snapshot names (reading only state_dir, like `agent status`:
    no secret needed), then wait for the snapshot to tell the reload's outcome."""
    import signal
    import time

    from agent.status import StatusFile, reload_target, state_dir_of

    status_file = StatusFile(state_dir_of(_config_path(args)))
    pid, found = reload_target(status_file.read())
    if pid is None:
        print(f"agent reload: no running agent to reload: {found} ({status_file.path}); start "
              "it with `agent run -c CONFIG`", file=sys.stderr)
        return EXIT_STARTUP
    before = _last_reload(status_file)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.wait
    while (outcome := _last_reload(status_file)) == before:
        if time.monotonic() >= deadline:
            print(f"agent reload: asked pid {pid} to reload, no outcome within {args.wait:g}s; "
                  "`agent status` shows it once there", file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(0.1)
    assert outcome is not None
    if not outcome.get("ok"):
        for problem in outcome.get("problems") or ():
            print(f"agent: config error: {problem}", file=sys.stderr)
        print(f"agent reload: pid {pid} refused the new configuration and goes on with the one "
              "it runs", file=sys.stderr)
        return EXIT_CONFIG
    waiting = outcome.get("restart_needed") or []
    print(f"agent reload: pid {pid} applied the configuration"
          + (f"; {', '.join(waiting)} changed: applied at the next restart only" if waiting
             else ""))
    return EXIT_OK


def _last_reload(status_file: Any) -> dict[str, Any] | None:
    value = status_file.read().value
    reload = value.get("reload") if isinstance(value, dict) else None
    return reload if isinstance(reload, dict) else None


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
        files = {p for pattern in source.paths
                 for p in expand(pattern, source.follow_symlinks)}
        parser: str = source.format
        if source.pattern is not None:
            parser += f" ({len(source.pattern.groupindex)} fields)"
        print(f"{source.name}: {parser}, include {len(source.include)}, exclude "
              f"{len(source.exclude)}, {len(source.fields)} static fields -> {source.database}; "
              f"{len(source.paths)} glob(s), {len(files)} file(s) now  [{source.file}]")
        for slow in fallback_warnings({
                "regex": [source.pattern] if source.format == "regex" else [],
                "include": source.include, "exclude": source.exclude,
                "multiline.start": [source.multiline.start] if source.multiline else []}):
            print(f"warning: {source.name}: {slow}  [{source.file}]", file=sys.stderr)
    # The URLs carry no credentials (config took them off); redact anyway, as a second guard.
    couchdb = config.couchdb
    urls = ", ".join(config_module.redact_url(u) for u in couchdb.urls)
    user = f" as {couchdb.username}" if couchdb.username else ""
    secret = f" (password from {couchdb.password_from})" if couchdb.password_from else ""
    print(f"ok: {len(config.sources)} source(s), CouchDB {urls}{user}{secret}, "
          f"state in {config.state_dir}")
    return EXIT_OK


def _parse(args: argparse.Namespace) -> int:
    from agent import send as send_module

    source = _parse_source(args)
    counters = SourceCounters()
    parser = SourceParser(source, host="", counters=counters)
    out = sys.stdout.buffer
    status = EXIT_OK
    inputs = args.files or ["-"]
    for name in inputs:
        try:
            for chunk in send_module.read_lines(name, LineSplitter(source.max_line_bytes)):
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


def _report_arguments(command: Any) -> None:
    report = command("report", "run a shipped map/reduce report (agent report --list), or "
                     "install the reports and the dashboard (--install, --dashboard)")
    report.add_argument("name", nargs="?", metavar="NAME",
                        help="the report, e.g. attacks; `fleet` lists every agent's host")
    report.add_argument("--list", action="store_true", help="one line per shipped report")
    report.add_argument("--install", action="store_true",
                        help="install the reports into --db (as an admin); unchanged ones are "
                        "not rewritten")
    report.add_argument("--dashboard", action="store_true",
                        help="install the dashboard app into couchlog_dashboard (as an admin)")
    report.add_argument("--url", help="CouchDB or the front (default: the config's first URL)")
    report.add_argument("--db", help="the log database (default: the config's, if only one)")
    report.add_argument("--user", help="a reader (an admin for --install)")
    report.add_argument("--password-file", type=Path, help="first line: the --user's password")
    group = report.add_mutually_exclusive_group()
    group.add_argument("--group-level", type=int, metavar="N")
    group.add_argument("--by", help="a named grouping: machine, day or hour (as the report has)")
    report.add_argument("--since", metavar="DATE", help="from this date or hour on (inclusive)")
    report.add_argument("--until", metavar="DATE", help="up to this date or hour (inclusive)")
    report.add_argument("--field", help="for top_values: the field whose values to rank")
    report.add_argument("--top", type=int, metavar="N", help="only the N largest values")
    report.add_argument("--format", choices=["table", "csv", "json"],
                        help="default: table on a terminal, csv otherwise")
    report.add_argument("--stale", choices=["ok"],
                        help="answer at once from the existing index and say how far behind it is")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from agent import fleet as fleet_module
    from agent import report as report_module

    url, database, user, password_file = args.url, args.db, args.user, args.password_file
    fleet_interval = fleet_module.INTERVAL
    if args.config is not None:
        # A reader needs neither the agent's password nor to be allowed to read it.
        config = config_module.load(args.config, need_secret=False)
        url = url or config.couchdb.urls[0]
        fleet_interval = config.fleet.interval or fleet_interval
        databases = {source.database for source in config.sources}
        if database is None and len(databases) == 1:
            database = databases.pop()
        if user is None and config.reader.username is not None:
            user, password_file = config.reader.username, password_file or config.reader.password_file
    password = None
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            print(f"agent report: cannot read a password from {password_file}: "
                  f"{getattr(exc, 'strerror', None) or 'empty file'}", file=sys.stderr)
            return EXIT_CONFIG
    if url is None:
        print("agent report: no server: give --url URL or -c CONFIG", file=sys.stderr)
        return EXIT_CONFIG
    tty = sys.stdout.isatty()
    options = report_module.Options(
        name=args.name, url=url, database=database, user=user, password=password,
        install=args.install, dashboard=args.dashboard, list_only=args.list,
        group_level=args.group_level, by=args.by, since=args.since, until=args.until,
        field_name=args.field, top=args.top, format=args.format or ("table" if tty else "csv"),
        stale=args.stale == "ok", colour=tty and "NO_COLOR" not in os.environ,
        fleet_interval=fleet_interval)
    try:
        return report_module.command(options, sys.stdout, sys.stderr)
    except report_module.ReportError as exc:
        print(f"agent report: {exc}", file=sys.stderr)
        return EXIT_CONFIG if exc.usage else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
