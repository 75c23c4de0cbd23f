"""Configuration: the main YAML file and one YAML file per source, validated once into frozen records.

Every key is declared once, in `MAIN_KEYS` or `SOURCE_KEYS`, with its type,
default and help text; `agent check --keys` prints that table. Loading
collects every problem it finds (file, key path, what was expected) and
raises one `ConfigError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import codecs
import difflib
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from agent.patterns import Pattern, compile_fields_regex, compile_pattern
from agent.schema import SchemaError, compile_schema

DEFAULT_CONFIG_PATH = Path("/etc/couchlog/agent.yaml")
SOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]*")
DATABASE_NAME = re.compile(r"[a-z][a-z0-9_$()+/-]*")

Format = Literal["schema", "regex", "json"]
OnParseError = Literal["ship", "drop"]
StartAt = Literal["beginning", "end"]
WatchMode = Literal["auto", "inotify", "poll"]
WIDE_ENCODINGS = frozenset({"utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"})
LogFormat = Literal["auto", "json", "console"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, and where."""

    file: Path | str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else str(self.file)
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class CouchDBConfig:
    urls: tuple[str, ...]
    username: str | None
    password: str | None
    request_timeout: float
    failback_after: float = 60.0


@dataclass(frozen=True, slots=True)
class ShippingConfig:
    batch_max_docs: int
    batch_max_bytes: int
    linger: float
    queue_max_docs: int
    queue_max_bytes: int
    retry_max_backoff: float
    concurrency: int = 2


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    max_bytes: int
    segment_bytes: int
    when_full: Literal["block", "drop_oldest"]


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One log source: which files, how to parse their lines, where documents go."""

    name: str
    file: Path | str
    database: str
    paths: tuple[str, ...]
    include: tuple[Pattern, ...]
    exclude: tuple[Pattern, ...]
    format: Format
    pattern: Pattern | None
    fields: Mapping[str, str]
    on_parse_error: OnParseError
    metadata_key: str
    max_line_bytes: int
    exclude_paths: tuple[str, ...] = ()
    start_at: StartAt = "beginning"
    watch: WatchMode = "auto"
    rotate_wait: float = 5.0
    encoding: str = "utf-8"
    multiline: MultilineConfig | None = None


@dataclass(frozen=True, slots=True)
class MultilineConfig:
    """A line matching `start` opens an event; other lines join the current one."""

    start: Pattern
    timeout: float
    max_bytes: int


@dataclass(frozen=True, slots=True)
class AgentConfig:
    path: Path
    couchdb: CouchDBConfig
    state_dir: Path
    sources_dir: Path
    host: str
    shipping: ShippingConfig
    log_level: str
    log_format: LogFormat
    shutdown_timeout: float
    scan_interval: float
    poll_interval: float = 1.0
    on_corrupt_state: StartAt = "beginning"
    spool: SpoolConfig = SpoolConfig(1024**3, 8 * 1024**2, "block")
    sources: tuple[SourceConfig, ...] = field(default=())


# -- value readers: each takes the raw YAML value and returns the typed value or raises ValueError


def _string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {_kind(value)}")
    text = str(value)
    if not text:
        raise ValueError("expected a non-empty string")
    return text


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive whole number, got {value!r}")
    return value


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "k": 1024, "K": 1024, "KB": 1000,
               "MiB": 1024**2, "M": 1024**2, "MB": 1000**2,
               "GiB": 1024**3, "G": 1024**3, "GB": 1000**3}


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value)
    match = _SIZE.fullmatch(str(value).strip())
    if not match or int(match[1]) <= 0:
        raise ValueError(f"expected a size such as 1048576, '512KiB' or '16MiB', got {value!r}")
    return int(match[1]) * _SIZE_UNITS[match[2]]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def _duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"expected a duration such as 5, '200ms', '30s' or '2m', got {value!r}")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds < 0:
        raise ValueError(f"expected a duration of zero or more, got {value!r}")
    return seconds


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    return tuple(_string(item) for item in value)


def _regex_list(value: Any) -> tuple[Pattern, ...]:
    patterns = []
    for index, text in enumerate(_string_list(value)):
        try:
            patterns.append(compile_pattern(text))
        except re.error as exc:
            raise ValueError(f"item {index}: invalid regular expression {text!r}: {exc}") from None
    return tuple(patterns)


def _regex(value: Any) -> Pattern:
    text = _string(value)
    try:
        return compile_pattern(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None


def _encoding(value: Any) -> str:
    name = _string(value).lower()
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}; use a Python codec name such as utf-8, "
                         "latin-1 or utf-16le") from None
    if info.name in ("utf-16", "utf-32"):
        raise ValueError(f"say which byte order: {info.name}le or {info.name}be")
    if info.name in WIDE_ENCODINGS or "\n".encode(info.name) == b"\n":
        return info.name
    raise ValueError(f"encoding {name!r} is not supported: it must be ASCII-compatible "
                     "(utf-8, latin-1, cp1252, ...) or UTF-16/32 with a byte order")


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of name: value, got {_kind(value)}")
    fields = {}
    for name, item in value.items():
        if isinstance(item, dict | list):
            raise ValueError(f"field {name!r}: expected a plain value, got {_kind(item)}")
        fields[str(name)] = "" if item is None else str(item)
    return fields


def _choice(*choices: str) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)
    return read


def _url_list(value: Any) -> tuple[str, ...]:
    urls = _string_list(value)
    if not urls:
        raise ValueError("expected at least one URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return tuple(url.rstrip("/") for url in urls)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(
        type(value), type(value).__name__)


# -- the key tables


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: its dotted path, reader, default and meaning."""

    path: str
    read: Callable[[Any], Any]
    default: Any
    help: str
    required: bool = False
    shown: str | None = None
    """The default as a person writes it, where `repr` would not be."""

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.shown is not None:
            return self.shown
        if self.default is None or self.default in ((), {}):
            return "none"
        return str(self.default)


REQUIRED: Any = object()

MAIN_KEYS: tuple[Key, ...] = (
    Key("couchdb.url", _url_list, REQUIRED, "CouchDB URL, or a list of them "
        "(credentials may be in the URL)", required=True),
    Key("couchdb.username", _string, None, "user the agent writes as"),
    Key("couchdb.password", _string, None, "that user's password"),
    Key("couchdb.password_file", _string, None, "file holding the password "
        "(first line), instead of couchdb.password"),
    Key("couchdb.request_timeout", _duration, 30.0, "seconds before a request is abandoned "
        "and retried"),
    Key("couchdb.failback_after", _duration, 60.0, "seconds on a fallback URL before the first "
        "URL is tried again"),
    Key("state_dir", _string, "/var/lib/couchlog", "folder for the offsets state file, the "
        "spool and the dead-letter file"),
    Key("sources_dir", _string, "conf.d", "folder of source files (*.yaml), "
        "relative to the main file's folder"),
    Key("host", _string, None, "host name put in every document", shown="this machine's name"),
    Key("shipping.batch_max_docs", _positive_int, 1000, "documents per _bulk_docs request"),
    Key("shipping.batch_max_bytes", _size, 4 * 1024**2, "bytes per _bulk_docs request",
        shown="4MiB"),
    Key("shipping.linger", _duration, 0.2, "seconds a partial batch waits for more documents"),
    Key("shipping.concurrency", _positive_int, 2, "_bulk_docs requests in flight at once per "
        "database, so CouchDB stores one batch while the next is made"),
    Key("shipping.queue_max_docs", _positive_int, 5000, "documents held in memory per "
        "database before reading pauses"),
    Key("shipping.queue_max_bytes", _size, 32 * 1024**2, "bytes held in memory per database "
        "before reading pauses", shown="32MiB"),
    Key("shipping.retry_max_backoff", _duration, 30.0, "longest wait between retries"),
    Key("spool.max_bytes", _size, 1024**3, "disk spool cap per database; when it is full, "
        "reading pauses (the log files hold the data)", shown="1GiB"),
    Key("spool.segment_bytes", _size, 8 * 1024**2, "size of one spool segment file",
        shown="8MiB"),
    Key("spool.when_full", _choice("block", "drop_oldest"), "block", "block: pause reading; "
        "drop_oldest: delete the oldest segment and count what it held"),
    Key("log.level", _choice("debug", "info", "warning", "error"), "info", "agent log level"),
    Key("log.format", _choice("auto", "json", "console"), "auto",
        "json, console, or auto (console on a terminal, json otherwise)"),
    Key("shutdown_timeout", _duration, 10.0, "seconds to deliver queued documents on stop"),
    Key("scan_interval", _duration, 10.0, "seconds between rescans of the path globs "
        "(a safety net for missed inotify events)"),
    Key("poll_interval", _duration, 1.0, "seconds between checks of files followed by polling "
        "(watch: poll, or when inotify is unavailable)"),
    Key("on_corrupt_state", _choice("beginning", "end"), "beginning",
        "where to start in files already there when the state file is unreadable (it is moved "
        "aside): beginning re-sends what CouchDB has (answered conflict), end skips what was "
        "written while the agent was down"),
)

SOURCE_KEYS: tuple[Key, ...] = (
    Key("name", _string, REQUIRED, "source name, [a-z][a-z0-9_-]*", required=True),
    Key("database", _string, None, "database the documents go to", shown="log_<name>"),
    Key("paths", _string_list, REQUIRED, "globs of files to follow (** matches folders)",
        required=True),
    Key("include", _regex_list, (), "keep a line only if it matches every one of these regexes"),
    Key("exclude", _regex_list, (), "drop a line that matches any of these regexes"),
    Key("schema", _string, None, "token schema, e.g. '$date $hour _ \\[$process\\] $ip'"),
    Key("regex", _string, None, "regex with named groups, (?P<name>...) or (?<name>...)"),
    Key("format", _choice("json"), None, "'json': each line is a JSON object"),
    Key("fields", _string_map, {}, "static fields added to every document"),
    Key("on_parse_error", _choice("ship", "drop"), "ship",
        "a line that does not parse is shipped raw with a parse_error marker, or dropped "
        "(and counted)"),
    Key("metadata_key", _string, "agent", "top-level key that holds the agent's metadata"),
    Key("max_line_bytes", _size, 1024**2, "longer lines are truncated, marked and counted",
        shown="1MiB"),
    Key("exclude_paths", _string_list, (), "globs of files not to follow even if `paths` "
        "matches them (e.g. '*.gz')"),
    Key("start_at", _choice("beginning", "end"), "beginning", "where to start in files that "
        "already exist when the agent first starts (no state yet); new files always start at "
        "their beginning"),
    Key("watch", _choice("auto", "inotify", "poll"), "auto", "how to notice changes: inotify, "
        "poll (for NFS and other filesystems without inotify), or auto (inotify, falling back "
        "to polling when watches cannot be had)"),
    Key("rotate_wait", _duration, 5.0, "seconds a file renamed or deleted out of `paths` is "
        "still read after it stops growing"),
    Key("encoding", _encoding, "utf-8", "the files' character encoding (e.g. latin-1, "
        "utf-16le); invalid bytes become U+FFFD and are counted"),
    Key("multiline.start", _regex, None, "regex that starts a new event; other lines are "
        "appended to the current event with \\n (e.g. '^\\[\\d{4}-')"),
    Key("multiline.timeout", _duration, 1.0, "seconds after which the last event is shipped "
        "if no line follows"),
    Key("multiline.max_bytes", _size, 1024**2, "longer events are truncated, marked and "
        "counted", shown="1MiB"),
)


# -- loading


class _Reader:
    """Reads declared keys out of one YAML mapping and records problems with their key path."""

    def __init__(self, file: Path | str, data: Mapping[str, Any], keys: Sequence[Key],
                 problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        self.values: dict[str, Any] = {}
        flat = _flatten(data, {k.path for k in keys})
        for unknown in sorted(set(flat) - {k.path for k in keys}):
            close = difflib.get_close_matches(unknown, [k.path for k in keys], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.problem(unknown, f"unknown key{hint}")
        for key in keys:
            if key.path not in flat or flat[key.path] is None:
                if key.required:
                    self.problem(key.path, f"missing; expected {key.help}")
                self.values[key.path] = None if key.default is REQUIRED else key.default
                continue
            try:
                self.values[key.path] = key.read(flat[key.path])
            except ValueError as exc:
                self.problem(key.path, str(exc))
                self.values[key.path] = None if key.default is REQUIRED else key.default

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, key, message))

    def __getitem__(self, path: str) -> Any:
        return self.values[path]


def _flatten(data: Mapping[str, Any], leaves: set[str], prefix: str = "") -> dict[str, Any]:
    """Dotted paths to values; a mapping under a declared leaf key stays whole."""
    flat: dict[str, Any] = {}
    for raw_key, value in data.items():
        path = f"{prefix}{raw_key}"
        if isinstance(value, dict) and path not in leaves:
            flat.update(_flatten(value, leaves, path + "."))
        else:
            flat[path] = value
    return flat


def _load_yaml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(Problem(path, "", "file not found; pass the right one with -c PATH"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(path, "", f"cannot read: {exc}"))
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(Problem(path, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}"))
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem(path, "", f"expected a mapping of keys at the top, got {_kind(data)}"))
        return None
    return data


def load(path: Path) -> AgentConfig:
    """Load and validate the main file and every source file; raise ConfigError on any problem."""
    problems: list[Problem] = []
    data = _load_yaml(path, problems)
    if data is None:
        raise ConfigError(problems)
    main = _Reader(path, data, MAIN_KEYS, problems)
    base = path.parent
    sources_dir = base / (main["sources_dir"] or "conf.d")
    couchdb = _couchdb(main, base)
    sources = _load_sources(sources_dir, problems)
    if problems:
        raise ConfigError(problems)
    return AgentConfig(
        path=path,
        couchdb=couchdb,
        state_dir=base / main["state_dir"],
        sources_dir=sources_dir,
        host=main["host"] or socket.gethostname(),
        shipping=ShippingConfig(
            batch_max_docs=main["shipping.batch_max_docs"],
            batch_max_bytes=main["shipping.batch_max_bytes"],
            linger=main["shipping.linger"],
            queue_max_docs=main["shipping.queue_max_docs"],
            queue_max_bytes=main["shipping.queue_max_bytes"],
            retry_max_backoff=main["shipping.retry_max_backoff"],
            concurrency=main["shipping.concurrency"],
        ),
        log_level=main["log.level"],
        log_format=main["log.format"],
        shutdown_timeout=main["shutdown_timeout"],
        scan_interval=main["scan_interval"],
        poll_interval=main["poll_interval"],
        on_corrupt_state=main["on_corrupt_state"],
        spool=SpoolConfig(main["spool.max_bytes"], main["spool.segment_bytes"],
                          main["spool.when_full"]),
        sources=sources,
    )


def _couchdb(main: _Reader, base: Path) -> CouchDBConfig:
    password = main["couchdb.password"]
    password_file = main["couchdb.password_file"]
    if password is not None and password_file is not None:
        main.problem("couchdb.password_file", "set either couchdb.password or "
                     "couchdb.password_file, not both")
    elif password_file is not None:
        try:
            password = (base / password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            reason = "it is empty" if isinstance(exc, IndexError) else str(exc)
            main.problem("couchdb.password_file", f"cannot read the password: {reason}")
    if password_file is None and (password is None) != (main["couchdb.username"] is None):
        missing = "couchdb.password" if password is None else "couchdb.username"
        main.problem(missing, "couchdb.username and a password go together; set both or neither")
    return CouchDBConfig(urls=main["couchdb.url"] or (), username=main["couchdb.username"],
                         password=password, request_timeout=main["couchdb.request_timeout"],
                         failback_after=main["couchdb.failback_after"])


def _load_sources(folder: Path, problems: list[Problem]) -> tuple[SourceConfig, ...]:
    if not folder.is_dir():
        problems.append(Problem(folder, "sources_dir", "folder not found; create it and put one "
                                "YAML file per log source in it"))
        return ()
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not files:
        problems.append(Problem(folder, "sources_dir", "no *.yaml source files; add one per log "
                                "source (see config/conf.d/ for an example)"))
    sources = []
    for file in files:
        data = _load_yaml(file, problems)
        if data is not None:
            source = source_from_mapping(file, data, problems, base=file.parent)
            if source is not None:
                sources.append(source)
    by_name: dict[str, Path | str] = {}
    for source in sources:
        if source.name in by_name:
            problems.append(Problem(source.file, "name", f"source {source.name!r} is also "
                                    f"defined in {by_name[source.name]}; names must be unique"))
        by_name[source.name] = source.file
    return tuple(sources)


def source_from_mapping(file: Path | str, data: Mapping[str, Any], problems: list[Problem],
                        base: Path | None = None) -> SourceConfig | None:
    """Validate one source's keys; used for conf.d files and for `agent parse` flags."""
    before = len(problems)
    src = _Reader(file, data, SOURCE_KEYS, problems)
    name = src["name"]
    if name is not None and not SOURCE_NAME.fullmatch(name):
        src.problem("name", f"expected lowercase letters, digits, '_' or '-', starting with a "
                    f"letter, got {name!r}")
    database = src["database"] or f"log_{name}"
    if src["database"] is not None and not DATABASE_NAME.fullmatch(database):
        src.problem("database", f"{database!r} is not a valid CouchDB database name "
                    "(lowercase, starting with a letter)")
    fmt, pattern = _parser_choice(src)
    for key in src["fields"]:
        if key.startswith("_"):
            src.problem(f"fields.{key}", "field names starting with '_' are reserved by CouchDB")
        elif key == src["metadata_key"]:
            src.problem(f"fields.{key}", f"{key!r} holds the agent's metadata (metadata_key); "
                        "rename the field, or set metadata_key to another name")
    paths = _absolute(src["paths"] or (), base)
    multiline = None
    if src["multiline.start"] is None and any(
            k.startswith("multiline.") for k in _flatten(data, set())):
        src.problem("multiline.start", "missing; the other multiline keys need it")
    if src["multiline.start"] is not None:
        multiline = MultilineConfig(src["multiline.start"], src["multiline.timeout"],
                                    src["multiline.max_bytes"])
    if len(problems) > before:
        return None
    return SourceConfig(
        name=name, file=file, database=database, paths=paths,
        include=src["include"], exclude=src["exclude"], format=fmt, pattern=pattern,
        fields=src["fields"], on_parse_error=src["on_parse_error"],
        metadata_key=src["metadata_key"], max_line_bytes=src["max_line_bytes"],
        exclude_paths=_absolute(src["exclude_paths"], base, keep_relative=True),
        start_at=src["start_at"], watch=src["watch"], rotate_wait=src["rotate_wait"],
        encoding=src["encoding"], multiline=multiline,
    )


def _absolute(globs: Sequence[str], base: Path | None, keep_relative: bool = False) -> tuple[str, ...]:
    """Globs relative to the source file's folder; an exclude glob without a folder ('*.gz')
    applies in every folder, so it stays as it is."""
    return tuple(g if base is None or Path(g).is_absolute() or (keep_relative and "/" not in g)
                 else str(base / g) for g in globs)


def _parser_choice(src: _Reader) -> tuple[Format, Pattern | None]:
    chosen = [key for key in ("schema", "regex", "format") if src[key] is not None]
    if len(chosen) != 1:
        given = ", ".join(chosen) if chosen else "none"
        src.problem("schema", f"set exactly one of schema, regex or format: json (given: {given})")
        return "json", None
    if src["schema"] is not None:
        try:
            return "schema", compile_schema(src["schema"])
        except SchemaError as exc:
            src.problem("schema", str(exc))
            return "schema", None
    if src["regex"] is not None:
        try:
            return "regex", compile_regex(src["regex"])
        except re.error as exc:
            src.problem("regex", f"invalid regular expression: {exc}")
            return "regex", None
    return "json", None


def compile_regex(text: str) -> Pattern:
    """Compile a regex, accepting the PCRE/Onigmo `(?<name>...)` spelling of named groups."""
    return compile_fields_regex(text)


def _code(text: str) -> str:
    return text if text in ("required", "none") or " " in text else f"`{text}`"


def describe_keys(markdown: bool = False) -> str:
    """The key reference: `agent check --keys` prints it, README.md embeds the markdown form."""
    lines = []
    for title, keys in (("main file (agent.yaml)", MAIN_KEYS),
                        ("source files (conf.d/*.yaml)", SOURCE_KEYS)):
        if markdown:
            lines += [f"**{title}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{k.path}` | {_code(k.default_text())} | {k.help} |" for k in keys]
        else:
            lines.append(f"# {title}")
            lines += [f"{k.path:26} {k.help} ({k.default_text()})" for k in keys]
        lines.append("")
    return "\n".join(lines)
