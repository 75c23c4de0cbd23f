"""Configuration: the main YAML file and one YAML file per source, validated once into frozen records.

Each key is declared once, on the attribute of the record that holds it (`key(...)`): its reader
(type), default, help text and, for a `Literal` type, its choices. The loader, `agent check
--keys` and README's key table all walk those declarations. A typed table rather than pydantic:
the records stay plain frozen, slotted dataclasses that other modules (and tests) build directly,
the readers give the messages operators need (sizes, durations, "quote it", redacted URLs), and
no dependency is added. Loading collects every problem it finds (file, key path, what was
expected) and raises one `ConfigError`, which the CLI turns into exit code 2. No message ever
contains a password: URLs are shown redacted and secrets are never echoed.
"""

# ruff: noqa: RUF009 - `key()`, `required()` and `section()` are dataclass field specifiers
# (they return `field(...)`), which ruff only recognises when they are spelled `field`.
from __future__ import annotations

import codecs
import datetime
import difflib
import fnmatch
import ipaddress
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import unquote, urlsplit

import yaml

from agent.durable import read_regular_file
from agent.patterns import Pattern, compile_fields_regex, compile_pattern
from agent.schema import SchemaError, compile_schema

DEFAULT_CONFIG_PATH = Path("/etc/couchlog/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/couchlog")
MAX_FILE_BYTES = 1024**2
"""Largest configuration or password file read: a real one is a few KiB."""
PASSWORD_ENV = "COUCHLOG_PASSWORD"
SOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]*")
DATABASE_NAME = re.compile(r"[a-z][a-z0-9_$()+/-]*")

Format = Literal["schema", "regex", "json"]
OnParseError = Literal["ship", "drop"]
StartAt = Literal["beginning", "end"]
WatchMode = Literal["auto", "inotify", "poll"]
WhenFull = Literal["block", "drop_oldest"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
WIDE_ENCODINGS = frozenset({"utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"})

T = TypeVar("T")


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


# -- value readers: each takes the raw YAML value and returns the typed value or raises ValueError.
# A reader never puts the value it refuses into its message when that value may be a secret.


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, datetime.date):
        return "a date"
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(
        type(value), type(value).__name__)


def _string(value: object) -> str:
    """Text only: YAML turns unquoted 0123, 12:30, 0x1F, 1.10, yes or 2024-01-01 into numbers,
    booleans and dates, and str() of those is not what was written."""
    if isinstance(value, bool | int | float | datetime.date):
        raise ValueError(f"expected text, got {_kind(value)}: YAML reads unquoted values such as "
                         "0123, 12:30, 0x1F, 1.10, yes or 2024-01-01 as numbers, booleans or dates; "
                         "put the value in quotes")
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_kind(value)}")
    if not value:
        raise ValueError("expected a non-empty string")
    return value


def _path(value: object) -> Path:
    return Path(_string(value))


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive whole number, got {value!r}")
    return value


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "k": 1024, "K": 1024, "KB": 1000,
               "MiB": 1024**2, "M": 1024**2, "MB": 1000**2,
               "GiB": 1024**3, "G": 1024**3, "GB": 1000**3}


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value)
    match = _SIZE.fullmatch(str(value).strip())
    if not match or int(match[1]) <= 0:
        raise ValueError(f"expected a size such as 1048576, '512KiB' or '16MiB', got {value!r}")
    return int(match[1]) * _SIZE_UNITS[match[2]]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def _duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"expected a duration such as 5, '200ms', '30s' or '2m', got {value!r}")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    # YAML reads .nan and .inf as floats: NaN makes every timeout fire at once (a busy loop).
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of zero or more, got {value!r}")
    return seconds


def _positive_duration(value: object) -> float:
    """A duration that must not be zero: a timeout of 0 is no timeout at all to aiohttp (a
    stalled server then holds a request forever), and an interval or a backoff of 0 is a
    busy loop."""
    seconds = _duration(value)
    if seconds == 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    items = []
    for index, item in enumerate(value):
        try:
            items.append(_string(item))
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return tuple(items)


def _glob_list(value: object) -> tuple[str, ...]:
    globs = _string_list(value)
    if not globs:
        raise ValueError("expected at least one glob; a source that follows no file ships nothing")
    return globs


def _regex_list(value: Any) -> tuple[Pattern, ...]:
    patterns = []
    for index, text in enumerate(_string_list(value)):
        try:
            patterns.append(compile_regex(text, named_groups=False))
        except re.error as exc:
            raise ValueError(f"item {index}: invalid regular expression {text!r}: {exc}") from None
    return tuple(patterns)


def _regex(value: Any) -> Pattern:
    text = _string(value)
    try:
        return compile_regex(text, named_groups=False)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None


def _encoding(value: object) -> str:
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


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of name: value, got {_kind(value)}")
    result = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise ValueError(f"field name {name!r}: YAML read it as {_kind(name)}; put it in quotes")
        if isinstance(item, dict | list):
            raise ValueError(f"field {name!r}: expected a plain value, got {_kind(item)}")
        try:
            result[name] = "" if item is None else _string(item)
        except ValueError as exc:
            raise ValueError(f"field {name!r}: {exc}") from None
    return result


class _Choice:
    """A reader for a `Literal` type: the choices are the Literal's values, stated nowhere else."""

    def __init__(self, literal: object) -> None:
        self.choices: tuple[str, ...] = get_args(literal)

    def __call__(self, value: object) -> Any:
        if value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return value


def _listen_address(value: object) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) to listen on; port 0 lets the system choose."""
    text = _string(value)
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:9464 or [::1]:9464, got {text!r}")
    return host, int(port)


def _url_list(value: object) -> tuple[str, ...]:
    urls = _string_list(value)
    if not urls:
        raise ValueError("expected at least one URL")
    for index, url in enumerate(urls):
        try:
            split_url(url)
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}" if len(urls) > 1 else str(exc)) from None
    return urls


# -- URLs and their credentials

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


@dataclass(frozen=True, slots=True)
class SplitUrl:
    """A CouchDB URL without its credentials, and the credentials it carried (percent-decoded)."""

    url: str
    username: str | None
    password: str | None = field(repr=False)


def redact_url(text: str) -> str:
    """`text` with everything up to its last `@` (the user:password part) replaced by `***`.
    Without an `@`, a port that is no port is replaced too: a password typed with `:` for `@`
    (`http://admin:s3cret:host:5984`, `http://admin:s3cret`) stands where the port goes.

    Works on text that does not parse as a URL too, so an error message can show it."""
    scheme = _SCHEME.match(text)
    head = scheme[0] if scheme else ""
    if "@" in text:
        return f"{head}***@{text.rpartition('@')[2]}"
    authority, slash, path = text[len(head):].partition("/")
    host, colon, port = authority.partition(":")
    if colon and not host.startswith("[") and not (port.isascii() and port.isdigit()
                                                   and 0 < int(port) < 65536):
        return f"{head}{host}:***{slash}{path}"
    return text


def split_url(text: str) -> SplitUrl:
    """Parse an http(s) base URL, taking `user:password@` off it; raise ValueError (redacted).

    The user:password part ends at the LAST `@`, and the user name at the first `:`, so a password
    may hold `@`, `:`, `/`, `?`, `#` and spaces as written; `%XX` escapes are decoded (write a
    literal `%` as `%25`)."""
    shown = redact_url(text)
    scheme = _SCHEME.match(text)
    if not scheme or scheme[1].lower() not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {shown!r}")
    rest = text[scheme.end():]
    userinfo, at, hostpart = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not user:
            raise ValueError(f"{shown!r} has no user name before the password")
        try:
            # strict: a %XX escape that is no UTF-8 would silently become U+FFFD in the password
            username = unquote(user, errors="strict")
            password = unquote(secret, errors="strict") if colon else None
        except UnicodeDecodeError:
            raise ValueError(f"{shown!r}: a %XX escape in the user or password is not UTF-8 "
                             "(write a literal % as %25)") from None
    clean = f"{scheme[1].lower()}://{hostpart}"
    try:
        parts = urlsplit(clean)
    except ValueError as exc:  # a bracketed host that is no IP address
        raise ValueError(f"{shown!r}: {exc}") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{shown!r} has no host name")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{shown!r}: {host!r} is not an IPv6 address") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{shown!r}: {host!r} is not a host name")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (parts.netloc.endswith(":") and port is None):
        raise ValueError(f"{shown!r}: the port must be a number from 1 to 65535")
    if parts.query or parts.fragment or "?" in hostpart or "#" in hostpart:
        raise ValueError(f"{shown!r}: a CouchDB base URL takes no ?query or #fragment (a password "
                         "holding ? or # goes before the @, or in couchdb.password)")
    return SplitUrl(clean.rstrip("/"), username, password)


# -- the key declarations

_SPEC = "couchlog.key"


@dataclass(frozen=True, slots=True)
class _KeySpec:
    name: str | None
    read: Callable[[Any], Any]
    help: str
    required: bool
    shown: str | None
    secret: bool


@dataclass(frozen=True, slots=True)
class _SectionSpec:
    name: str
    record: type
    optional: bool


def key(read: Callable[[Any], T], default: T, help: str, *, name: str | None = None,
        shown: str | None = None, secret: bool = False) -> T:
    """Declare an attribute as a configuration key (`name` when the key is spelled otherwise)."""
    spec = _KeySpec(name, read, help, False, shown, secret)
    if isinstance(default, dict):
        return cast(T, field(default_factory=lambda: dict(default), metadata={_SPEC: spec}))
    return field(default=default, metadata={_SPEC: spec}, repr=not secret)


def required(read: Callable[[Any], T], help: str, *, name: str | None = None) -> T:
    """Declare a key that has no default."""
    return cast(T, field(metadata={_SPEC: _KeySpec(name, read, help, True, None, False)}))


def section(record: type[T], name: str, *, optional: bool = False) -> T:
    """Declare an attribute whose keys live under `name.` and are declared on `record`."""
    spec = _SectionSpec(name, record, optional)
    if optional:
        return cast(T, field(default=None, metadata={_SPEC: spec}))
    return field(default_factory=record, metadata={_SPEC: spec})


@dataclass(frozen=True, slots=True)
class CouchDBConfig:
    """Where documents go. `urls` carry no credentials: config takes them off into
    `username`/`password`, so a URL can be logged as it is."""

    urls: tuple[str, ...] = required(_url_list, "CouchDB URL, or a list of them to fail over "
                                     "between; user:password@ in it is taken off into "
                                     "couchdb.username and the password", name="url")
    username: str | None = key(_string, None, "user the agent writes as")
    password: str | None = key(_string, None, "that user's password; better in "
                               "couchdb.password_file or the COUCHLOG_PASSWORD environment "
                               "variable", secret=True)
    request_timeout: float = key(_positive_duration, 30.0, "seconds before a request is abandoned and "
                                 "retried")
    failback_after: float = key(_duration, 60.0, "while on a fallback URL, seconds between "
                                "probes of the first URL (GET /_up); the agent fails back once "
                                "one answers")
    password_file: Path | None = key(_path, None, "file holding the password (its first line), "
                                     "relative to the main file's folder; readable by the agent "
                                     "only (0600/0640)")
    ca_file: Path | None = key(_path, None, "CA bundle (PEM) that verifies the server's "
                               "certificate for https:// URLs", shown="the system's CAs")
    tls_verify: bool = key(_bool, True, "verify the server's certificate and host name for "
                           "https:// URLs (false only for tests)")
    password_from: str = ""
    """Where the password came from (a key or the environment variable), for `agent check`."""


@dataclass(frozen=True, slots=True)
class ShippingConfig:
    batch_max_docs: int = key(_positive_int, 1000, "documents per _bulk_docs request")
    batch_max_bytes: int = key(_size, 4 * 1024**2, "bytes per _bulk_docs request", shown="4MiB")
    linger: float = key(_duration, 0.2, "seconds a partial batch waits for more documents")
    queue_max_docs: int = key(_positive_int, 5000, "documents held in memory per database before "
                              "reading pauses")
    queue_max_bytes: int = key(_size, 32 * 1024**2, "bytes held in memory per database before "
                               "reading pauses", shown="32MiB")
    retry_max_backoff: float = key(_positive_duration, 30.0, "longest wait between retries")
    concurrency: int = key(_positive_int, 2, "_bulk_docs requests in flight at once per database, "
                           "so CouchDB stores one batch while the next is made")


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    max_bytes: int = key(_size, 1024**3, "disk spool cap per database; when it is full, reading "
                         "pauses (the log files hold the data)", shown="1GiB")
    segment_bytes: int = key(_size, 8 * 1024**2, "size of one spool segment file", shown="8MiB")
    when_full: WhenFull = key(_Choice(WhenFull), "block", "what a full spool does: block pauses "
                              "reading; drop_oldest deletes the oldest segment and counts what it "
                              "held")


@dataclass(frozen=True, slots=True)
class StatusConfig:
    """Thresholds of `agent status` (a monitoring plugin: 0 OK, 1 WARNING, 2 CRITICAL, 3
    UNKNOWN). Only `agent status` reads them, so a change needs no restart of the agent."""

    critical_after: float = key(_duration, 300.0, "CRITICAL once CouchDB took no document for "
                                "this long while the agent has some to send (WARNING before: "
                                "retrying)", shown="5m")
    lag_warning: int = key(_size, 64 * 1024**2, "WARNING when the followed files hold more "
                           "unread bytes than this, summed over all sources", shown="64MiB")
    dead_letter_window: float = key(_duration, 3600.0, "CRITICAL while a document was "
                                    "dead-lettered (refused by CouchDB for good) this recently",
                                    shown="1h")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (`/metrics`, and `/health`), off unless `listen` is given."""

    listen: tuple[str, int] | None = key(_listen_address, None, "host:port serving /metrics "
                                         "(Prometheus) and /health (200 OK, 503 otherwise), e.g. "
                                         "127.0.0.1:9464", shown="off")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """This agent's record in the `couchlog_fleet` database (`agent report fleet`)."""

    interval: float = key(_duration, 60.0, "seconds between this host's fleet documents (also "
                          "written at start and stop); `agent report fleet` flags a host after "
                          "3 intervals; 0 turns them off", shown="1m")


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """The login `agent report` reads as (a couchlog_reader user); the agent never uses it."""

    username: str | None = key(_string, None, "user `agent report` reads as (a member of "
                               "couchlog_reader)", shown="none (give --user)")
    password_file: Path | None = key(_path, None, "file holding that user's password (its first "
                                     "line), relative to the main file's folder",
                                     shown="none (give --password-file)")


@dataclass(frozen=True, slots=True)
class MultilineConfig:
    """A line matching `start` opens an event; other lines join the current one."""

    start: Pattern = required(_regex, "regex that starts a new event; other lines are "
                                      "appended to the current event with \\n (e.g. '^\\[\\d{4}-')")
    timeout: float = key(_duration, 1.0, "seconds after which the last event is shipped if no "
                         "line follows")
    max_bytes: int = key(_size, 1024**2, "longer events are truncated, marked and counted",
                         shown="1MiB")


@dataclass(frozen=True, slots=True)
class _ParserKeys:
    """The keys that choose a source's parser; they become `SourceConfig.format` and `.pattern`."""

    schema: str | None = key(_string, None, "token schema, e.g. '$date $hour _ \\[$process\\] $ip'")
    regex: str | None = key(_string, None, "regex with named groups, (?P<name>...) or (?<name>...)")
    format: Literal["json"] | None = key(_Choice(Literal["json"]), None,
                                         "'json': each line is a JSON object")


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """One log source: which files, how to parse their lines, where documents go."""

    name: str = required(_string, "source name, [a-z][a-z0-9_-]*")
    file: Path | str
    database: str = key(_string, "", "database the documents go to", shown="log_<name>")
    paths: tuple[str, ...] = required(_glob_list, "globs of files to follow (** matches "
                                      "folders), relative to the source file's folder")
    include: tuple[Pattern, ...] = key(_regex_list, (), "keep a line only if it matches "
                                               "every one of these regexes")
    exclude: tuple[Pattern, ...] = key(_regex_list, (), "drop a line that matches any of "
                                               "these regexes")
    parser_keys: _ParserKeys = section(_ParserKeys, "")
    format: Format = "json"
    pattern: Pattern | None = None
    fields: Mapping[str, str] = key(_string_map, {}, "static fields added to every document "
                                    "(quote values YAML would read as numbers)")
    on_parse_error: OnParseError = key(_Choice(OnParseError), "ship", "a line that does not parse "
                                       "is shipped raw with a parse_error marker, or dropped; "
                                       "either way it is counted")
    metadata_key: str = key(_string, "agent", "top-level key that holds the agent's metadata")
    max_line_bytes: int = key(_size, 1024**2, "longer lines are truncated, marked and counted",
                              shown="1MiB")
    exclude_paths: tuple[str, ...] = key(_string_list, (), "globs of files not to follow even if "
                                         "`paths` matches them (e.g. '*.gz')")
    start_at: StartAt = key(_Choice(StartAt), "beginning", "where to start in files that already "
                            "exist when the agent first starts (no state yet); new files always "
                            "start at their beginning")
    watch: WatchMode = key(_Choice(WatchMode), "auto", "how to notice changes; poll suits NFS and "
                           "other filesystems without inotify; auto is inotify, falling back to "
                           "polling when watches cannot be had")
    rotate_wait: float = key(_duration, 5.0, "seconds a file renamed or deleted out of `paths` is "
                             "still read after it stops growing")
    encoding: str = key(_encoding, "utf-8", "the files' character encoding (e.g. latin-1, "
                        "utf-16le); invalid bytes become U+FFFD and are counted")
    multiline: MultilineConfig | None = section(MultilineConfig, "multiline", optional=True)
    follow_symlinks: bool = key(_bool, False, "follow symlinks whose target is a regular file "
                                "(symlinks are skipped otherwise)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    path: Path
    couchdb: CouchDBConfig = section(CouchDBConfig, "couchdb")
    state_dir: Path = key(_path, DEFAULT_STATE_DIR, "folder for the offsets state file, "
                          "the spool and the dead-letter file (relative to the main file's folder)")
    sources_dir: Path = key(_path, Path("conf.d"), "folder of source files (*.yaml), relative to "
                            "the main file's folder")
    host: str = key(_string, "", "host name put in every document", shown="this machine's name")
    shipping: ShippingConfig = section(ShippingConfig, "shipping")
    log_level: LogLevel = key(_Choice(LogLevel), "info", "agent log level", name="log.level")
    log_format: LogFormat = key(_Choice(LogFormat), "auto", "how the agent's log is written; auto is "
                                "console on a terminal, json otherwise", name="log.format")
    shutdown_timeout: float = key(_duration, 10.0, "seconds to deliver queued documents on stop")
    scan_interval: float = key(_positive_duration, 10.0, "seconds between rescans of the path globs (a "
                               "safety net for missed inotify events)")
    poll_interval: float = key(_positive_duration, 1.0, "seconds between checks of files followed by "
                               "polling (watch: poll, or when inotify is unavailable)")
    on_corrupt_state: StartAt = key(_Choice(StartAt), "beginning", "where to start in files "
                                    "already there when the state file is unreadable (it is moved "
                                    "aside): the beginning re-sends what CouchDB has (answered "
                                    "conflict), the end skips what was written while the agent "
                                    "was down")
    spool: SpoolConfig = section(SpoolConfig, "spool")
    status: StatusConfig = section(StatusConfig, "status")
    metrics: MetricsConfig = section(MetricsConfig, "metrics")
    fleet: FleetConfig = section(FleetConfig, "fleet")
    reader: ReaderConfig = section(ReaderConfig, "reader")
    sources: tuple[SourceConfig, ...] = ()
    warnings: tuple[Problem, ...] = ()
    """Things that work but should be fixed (a password others can read); `agent check` prints
    them and `agent run` logs them."""


# -- the key table, walked out of the records above


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: its dotted path, reader, default and meaning."""

    path: str
    attribute: str
    read: Callable[[Any], Any]
    default: Any
    help: str
    required: bool = False
    shown: str | None = None

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.shown is not None:
            return self.shown
        if self.default is None or self.default in ((), {}, ""):
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return str(self.default)

    def help_text(self) -> str:
        choices = getattr(self.read, "choices", None)
        return f"{self.help} (one of: {', '.join(choices)})" if choices else self.help


def _keys(record: type, prefix: str = "", optional: bool = False) -> Iterator[Key]:
    for item in fields(record):
        spec = item.metadata.get(_SPEC)
        if isinstance(spec, _SectionSpec):
            yield from _keys(spec.record, f"{prefix}{spec.name}." if spec.name else prefix,
                             spec.optional)
        elif isinstance(spec, _KeySpec):
            default = item.default_factory() if item.default_factory is not MISSING else item.default
            # A required key of an optional section is required only once the section is used.
            shown = f"none; required with the other {prefix}* keys" \
                if optional and spec.required else spec.shown
            yield Key(prefix + (spec.name or item.name), item.name, spec.read,
                      None if default is MISSING else default, spec.help,
                      spec.required and not optional, shown)


MAIN_KEYS: tuple[Key, ...] = tuple(_keys(AgentConfig))
SOURCE_KEYS: tuple[Key, ...] = tuple(_keys(SourceConfig))


# -- loading


class _File:
    """One YAML mapping being read: its flattened keys, and the problems found in it."""

    def __init__(self, file: Path | str, data: Mapping[str, Any], keys: Sequence[Key],
                 problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        leaves = {k.path for k in keys}
        self.flat = _flatten(data, leaves)
        sections = {leaf[:i] for leaf in leaves for i, c in enumerate(leaf) if c == "."}
        for path in sorted(sections & set(self.flat)):
            # A section written as something else than a mapping: `shipping:` with all its keys
            # commented out is an empty section; a list or text there is a mistake to name as
            # such, not an "unknown key".
            value = self.flat.pop(path)
            if value is not None:
                inner = sorted(leaf for leaf in leaves if leaf.startswith(path + "."))
                self.problem(path, f"expected a mapping of keys ({', '.join(inner[:3])}"
                             f"{', ...' if len(inner) > 3 else ''}), got {_kind(value)}")
        for unknown in sorted(set(self.flat) - leaves):
            close = difflib.get_close_matches(unknown, sorted(leaves), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.problem(unknown, f"unknown key{hint}")

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, key, message))

    def given(self, path: str) -> bool:
        return self.flat.get(path) is not None

    def record(self, record: type[T], prefix: str = "", **derived: Any) -> T | None:
        """Build `record` from its declared keys (and sections); None if a key was wrong."""
        before = len(self.problems)
        values: dict[str, Any] = {}
        for item in fields(record):  # type: ignore[arg-type]
            spec = item.metadata.get(_SPEC)
            if isinstance(spec, _SectionSpec):
                inner = f"{prefix}{spec.name}." if spec.name else prefix
                if spec.optional and not any(p.startswith(inner) for p in self.flat):
                    continue
                values[item.name] = self.record(spec.record, inner)
            elif isinstance(spec, _KeySpec):
                path = prefix + (spec.name or item.name)
                if not self.given(path):
                    if spec.required:
                        self.problem(path, f"missing; expected {spec.help}")
                    continue
                try:
                    values[item.name] = spec.read(self.flat[path])
                except ValueError as exc:
                    self.problem(path, str(exc))
        if len(self.problems) > before:
            return None
        return record(**values, **derived)


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


MAX_NODES = 100_000
"""A config expands to far fewer nodes; more means aliases multiply it (a "billion laughs")."""


def _expanded_nodes(root: object) -> int | None:
    """How many nodes `root` has once YAML aliases are expanded; None if an alias makes a node
    contain itself (`a: &x [*x]`). Each shared node is sized once, so this is linear."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()

    def size(node: object) -> int | None:
        if not isinstance(node, dict | list):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in inside:
            return None
        inside.add(id(node))
        total = 1
        for item in node.values() if isinstance(node, dict) else node:
            inner = size(item)
            if inner is None:
                return None
            total += inner
        inside.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently, so a second `url:` or `password:` written further down (or left
    from an edit) would quietly replace the first. Keys merged in with `<<: *anchor` may still
    be overridden: that is what merging is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node, deep=True)
            try:
                duplicate = name in seen
            except TypeError:  # unhashable: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {name} twice; YAML would keep only the last, so give it once",
                    key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


_YAML_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
"""A quoted word in a PyYAML message (the repr of a character, token, tag or alias name)."""
_YAML_SAFE_WORD = re.compile(r".?|\\.|\\x..|<[\w ]+>")
"""Words shown: one character (',', '\\t') or a token kind ('<block mapping start>'). A tag or
alias name is not: it is the value as written when an unquoted value starts with ! or *
(`password: !Pa55`)."""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong, without the words it quotes from the file: those may be a
    password, and `agent check` writes its messages to the journal. Line and column say where."""
    problem = str(getattr(exc, "problem", None) or exc)
    shown = _YAML_TOKEN.sub(lambda m: m[0] if _YAML_SAFE_WORD.fullmatch(m[0][1:-1])
                            else "(not shown)", problem)
    if shown != problem:
        shown += "; quote a value that starts with !, &, * or another YAML sign"
    return shown


def load_yaml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        problems.append(Problem(path, "", "is a symlink to a missing file" if path.is_symlink()
                                else "file not found; pass the right one with -c PATH"))
        return None
    except IsADirectoryError:
        problems.append(Problem(path, "", "is a folder, not a YAML file"))
        return None
    except PermissionError:
        problems.append(Problem(path, "", "cannot read: permission denied; run as a user who "
                                "can read it"))
        return None
    except OSError as exc:
        problems.append(Problem(path, "", f"cannot read: {exc.strerror or exc}"))
        return None
    except UnicodeDecodeError as exc:
        problems.append(Problem(path, "", f"cannot read: {exc}"))
        return None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
        nodes = _expanded_nodes(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(Problem(path, "", f"invalid YAML: {where}{_yaml_problem(exc)}"))
        return None
    except RecursionError:
        problems.append(Problem(path, "", "invalid YAML: nested too deeply"))
        return None
    if nodes is None:
        problems.append(Problem(path, "", "invalid YAML: an alias (*name) refers to the node that "
                                "contains it"))
        return None
    if nodes > MAX_NODES:
        problems.append(Problem(path, "", f"invalid YAML: its aliases expand it to over "
                                f"{MAX_NODES} values"))
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem(path, "", f"expected a mapping of keys at the top, got {_kind(data)}"))
        return None
    return data


def load(path: Path, need_secret: bool = True) -> AgentConfig:
    """Load and validate the main file and every source file; raise ConfigError on any problem.

    With `need_secret=False` (for `agent status`) the password file and the environment are not
    read, so an operator who may not read the password can still load the configuration."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    data = load_yaml(path, problems)
    if data is None:
        raise ConfigError(problems)
    main = _File(path, data, MAIN_KEYS, problems)
    base = path.parent
    made = main.record(AgentConfig, path=path)
    sources_dir = base / (made.sources_dir if made else _given_path(main, "sources_dir", "conf.d"))
    couchdb = _credentials(main, made.couchdb, base, need_secret, warnings) if made else None
    sources = _load_sources(sources_dir, problems)
    if problems or made is None or couchdb is None:
        raise ConfigError(problems)
    reader = made.reader
    if reader.password_file is not None:
        reader = replace(reader, password_file=base / reader.password_file)
    return replace(made, couchdb=couchdb, state_dir=base / made.state_dir, sources_dir=sources_dir,
                   host=made.host or socket.gethostname(), sources=sources, reader=reader,
                   warnings=tuple(warnings))


def status_thresholds(path: Path, data: Mapping[str, Any]) -> StatusConfig:
    """The `status.*` keys of the main file's parsed YAML `data`, checked as `load` checks them;
    for `agent status`, which reads nothing else (no secret, no source file)."""
    problems: list[Problem] = []
    keys = [k for k in MAIN_KEYS if k.path.startswith("status.")]
    made = _File(path, {"status": data.get("status") or {}}, keys, problems).record(
        StatusConfig, "status.")
    if problems or made is None:
        raise ConfigError(problems)
    return made


def _given_path(main: _File, path: str, default: str) -> str:
    value = main.flat.get(path)
    return value if isinstance(value, str) and value else default


def _credentials(main: _File, couchdb: CouchDBConfig, base: Path, need_secret: bool,
                 warnings: list[Problem]) -> CouchDBConfig | None:
    """Take user:password@ off the URLs and settle on one username and one password.

    The password comes from exactly one of couchdb.password_file, couchdb.password or the URL
    (two of them is an error); only when the config names none is COUCHLOG_PASSWORD used."""
    before = len(main.problems)
    split = [split_url(url) for url in couchdb.urls]
    users = {s.username for s in split if s.username is not None}
    secrets = {s.password for s in split if s.password is not None}
    if len(users) > 1 or len(secrets) > 1:
        main.problem("couchdb.url", "the URLs carry different credentials; put one user in "
                     "couchdb.username and its password in couchdb.password_file")
    username = couchdb.username
    if users and username is not None and users != {username}:
        main.problem("couchdb.username", "differs from the user in couchdb.url; give it once")
    username = username if username is not None else next(iter(users), None)
    given = {name: value for name, value in (("couchdb.password_file", couchdb.password_file),
                                             ("couchdb.password", couchdb.password),
                                             ("couchdb.url", next(iter(secrets), None)))
             if value is not None}
    if len(given) > 1:
        main.problem(sorted(given)[0], f"the password is given by {' and '.join(sorted(given))}; "
                     "give it once")
    password: str | None = None
    source = next(iter(given), "")
    if source in ("couchdb.password", "couchdb.url"):
        password = couchdb.password if source == "couchdb.password" else next(iter(secrets))
        if _others_can_read(main.file):
            warnings.append(Problem(main.file, source, "this file holds a password and every user "
                                    "can read it; chmod o-r it, or move the password to "
                                    "couchdb.password_file (mode 0600)"))
    elif source == "couchdb.password_file" and couchdb.password_file is not None and need_secret:
        password = _read_password(main, base / couchdb.password_file, warnings)
    environment = os.environ.get(PASSWORD_ENV) if need_secret else None
    if environment and source:
        warnings.append(Problem(main.file, source, f"{PASSWORD_ENV} is set too and is ignored: "
                                f"{source} wins"))
    elif environment and username is None:
        warnings.append(Problem(main.file, "couchdb.username", f"{PASSWORD_ENV} is set but no "
                                "user is; it is ignored"))
    elif environment:
        password, source = environment, PASSWORD_ENV
    if need_secret and len(given) < 2 and (password is None) != (username is None):
        missing = "couchdb.password" if password is None else "couchdb.username"
        main.problem(missing, "couchdb.username and a password go together; set both or neither "
                     f"(the password from couchdb.password_file, couchdb.password or {PASSWORD_ENV})")
    if len(main.problems) > before:
        return None
    return replace(couchdb, urls=tuple(s.url for s in split), username=username,
                   password=password, password_file=(base / couchdb.password_file
                                                     if couchdb.password_file else None),
                   ca_file=base / couchdb.ca_file if couchdb.ca_file else None,
                   password_from=source if password is not None else "")


def _others_can_read(path: Path | str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _read_password(main: _File, path: Path, warnings: list[Problem]) -> str | None:
    try:
        # utf-8-sig: an editor's byte order mark is no part of the password.
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        main.problem("couchdb.password_file", f"cannot read the password from {path}: {reason}")
        return None
    # The first line ends at \n (\r\n too) only: str.splitlines would also cut at \f, \x85 or
    # U+2028, characters a password may hold.
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        main.problem("couchdb.password_file", f"{path} is empty; put the password on its first line")
        return None
    if _others_can_read(path):
        warnings.append(Problem(path, "couchdb.password_file", "every user can read this password "
                                "file; chmod 0600 it (or 0640 with the agent's group)"))
    return password


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
        data = load_yaml(file, problems)
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
    src = _File(file, data, SOURCE_KEYS, problems)
    made = src.record(SourceConfig, file=file)
    if made is None:
        return None
    if not SOURCE_NAME.fullmatch(made.name):
        src.problem("name", f"expected lowercase letters, digits, '_' or '-', starting with a "
                    f"letter, got {made.name!r}")
    database = made.database or f"log_{made.name}"
    if made.database and not DATABASE_NAME.fullmatch(database):
        src.problem("database", f"{database!r} is not a valid CouchDB database name "
                    "(lowercase, starting with a letter)")
    if made.metadata_key.startswith("_"):
        src.problem("metadata_key", "names starting with '_' are reserved by CouchDB; choose "
                    "another (the default is 'agent')")
    for name in made.fields:
        if name.startswith("_"):
            src.problem(f"fields.{name}", "field names starting with '_' are reserved by CouchDB")
        elif name == made.metadata_key:
            src.problem(f"fields.{name}", f"{name!r} holds the agent's metadata (metadata_key); "
                        "rename the field, or set metadata_key to another name")
    fmt, pattern = _parser_choice(src, made.parser_keys)
    if len(problems) > before:
        return None
    return replace(made, database=database, format=fmt, pattern=pattern,
                   paths=_absolute(made.paths, base),
                   exclude_paths=_absolute(made.exclude_paths, base, keep_relative=True))


def _absolute(globs: Sequence[str], base: Path | None, keep_relative: bool = False) -> tuple[str, ...]:
    """Globs relative to the source file's folder; an exclude glob without a folder ('*.gz')
    applies in every folder, so it stays as it is."""
    return tuple(g if base is None or Path(g).is_absolute() or (keep_relative and "/" not in g)
                 else str(base / g) for g in globs)


def _parser_choice(src: _File, keys: _ParserKeys) -> tuple[Format, Pattern | None]:
    chosen = [name for name in ("schema", "regex", "format") if getattr(keys, name) is not None]
    if len(chosen) != 1:
        given = ", ".join(chosen) if chosen else "none"
        src.problem("schema", f"set exactly one of schema, regex or format: json (given: {given})")
        return "json", None
    if keys.schema is not None:
        try:
            return "schema", compile_schema(keys.schema)
        except SchemaError as exc:
            src.problem("schema", str(exc))
            return "schema", None
    if keys.regex is not None:
        try:
            return "regex", compile_regex(keys.regex)
        except re.error as exc:
            src.problem("regex", f"invalid regular expression: {exc}")
            return "regex", None
    return "json", None


def compile_regex(text: str, named_groups: bool = True) -> Pattern:
    """Compile a user's regex: the one place they all are compiled (regex, include, exclude,
    multiline.start), on the engine agent.patterns chooses (RE2, else time-bounded). Accepts the
    PCRE/Onigmo `(?<name>...)` spelling of named groups; a `regex` key's pattern must name its
    groups (`named_groups`)."""
    return compile_fields_regex(text) if named_groups else compile_pattern(text)


# -- checks that look outside the configuration


def globs_reaching(config: AgentConfig) -> list[Problem]:
    """Sources whose globs could match a file under state_dir (the agent would ship its own
    state, and every write of it would be a new line)."""
    state = [_parts(config.state_dir)]
    resolved = _parts(_real(config.state_dir))
    if resolved not in state:
        state.append(resolved)
    found = []
    for source in config.sources:
        for written in source.paths:
            spellings = {_parts(Path(written)), _resolved_glob(written)}
            if any(_may_reach(pattern, folder) for pattern in spellings for folder in state):
                found.append(Problem(source.file, "paths", f"{written!r} can match files in state_dir "
                                     f"({config.state_dir}); the agent would ship its own state. "
                                     "Narrow the glob or move state_dir"))
    return found


def _real(path: Path) -> Path:
    """`path` with its symlinks resolved as far as they go: Path.resolve raises RuntimeError on
    a symlink loop (`ln -s a a`), os.path.realpath stops there."""
    return Path(os.path.realpath(path))


def _parts(path: Path) -> tuple[str, ...]:
    return Path(os.path.normpath(path)).parts


def _resolved_glob(glob: str) -> tuple[str, ...]:
    """The glob with its folders before the first wildcard resolved (a symlink to state_dir)."""
    parts = _parts(Path(glob))
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    return _real(Path(*parts[:fixed])).parts + parts[fixed:] if fixed else parts


def _may_reach(pattern: Sequence[str], folder: Sequence[str]) -> bool:
    """True if some path inside `folder` (at any depth) matches the glob `pattern` (parts)."""
    if not folder:
        return bool(pattern)
    if not pattern:
        return False
    head = pattern[0]
    if head == "**":
        return _may_reach(pattern[1:], folder) or _may_reach(pattern, folder[1:])
    return fnmatch.fnmatchcase(folder[0], head) and _may_reach(pattern[1:], folder[1:])


# -- the key reference


def _code(text: str) -> str:
    return text if text in ("required", "none") or " " in text else f"`{text}`"


def describe_keys(markdown: bool = False) -> str:
    """The key reference: `agent check --keys` prints it, README.md embeds the markdown form."""
    lines = []
    for title, keys in (("main file (agent.yaml)", MAIN_KEYS),
                        ("source files (conf.d/*.yaml)", SOURCE_KEYS)):
        if markdown:
            lines += [f"**{title}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{k.path}` | {_code(k.default_text())} | {k.help_text()} |" for k in keys]
        else:
            lines.append(f"# {title}")
            lines += [f"{k.path:26} {k.help_text()} ({k.default_text()})" for k in keys]
        lines.append("")
    return "\n".join(lines)
