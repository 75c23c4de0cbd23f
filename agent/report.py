"""Reports: the design documents shipped in agent/reports/, installing them, and `agent report`.

Each folder of agent/reports/ is one design document: `design.yaml` names its views, their
map and reduce (a JavaScript file, or a built-in such as `_count`) and their key layout; the
layout is what turns `--since`, `--until` and `--by` into `startkey`, `endkey` and
`group_level`. The pure part (loading, planning a query, rendering rows) does no I/O; `Couch`
is the thin HTTP shell, synchronous because `agent report` is a one-shot command.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import mimetypes
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import yaml

from agent import fleet

REPORTS_DIR = Path(__file__).resolve().parent / "reports"
DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
DASHBOARD_DATABASE = "couchlog_dashboard"
DASHBOARD_DOC = "_design/dashboard"
BUILTIN_REDUCES = frozenset({"_count", "_sum", "_stats", "_approx_count_distinct"})
# Key parts that are time: the seed's numeric date (month counted from 0, as JS's getMonth()),
# and ISO strings (`date` YYYY-MM-DD, `hour` YYYY-MM-DDTHH).
TIME_PARTS = frozenset({"year", "month0", "day", "date", "hour"})
Format = Literal["table", "csv", "json"]


class ReportError(Exception):
    """A report cannot run: what went wrong and what to do. Never carries a secret."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class ViewSpec:
    """One view of a shipped design document, as its design.yaml describes it."""

    design: str
    name: str
    about: str
    map: str
    reduce: str | None
    key: tuple[str, ...]
    key_is_array: bool
    group_level: int
    by: Mapping[str, int] = field(default_factory=dict)
    chart: bool = False
    top: bool = False
    field_choice: bool = False

    @property
    def time_index(self) -> int | None:
        """Where the time parts of the key begin, or None when the key has no time."""
        return next((i for i, part in enumerate(self.key) if part in TIME_PARTS), None)


@dataclass(frozen=True, slots=True)
class DesignSpec:
    name: str
    language: str
    views: tuple[ViewSpec, ...]

    def document(self) -> dict[str, Any]:
        views: dict[str, Any] = {}
        for view in self.views:
            views[view.name] = {"map": view.map}
            if view.reduce is not None:
                views[view.name]["reduce"] = view.reduce
        return {"_id": f"_design/{self.name}", "language": self.language, "views": views}


def load_designs(folder: Path = REPORTS_DIR) -> list[DesignSpec]:
    """Every design document under `folder`, one per sub-folder holding a design.yaml."""
    designs = []
    for path in sorted(folder.glob("*/design.yaml")):
        designs.append(_load_design(path))
    if not designs:
        raise ReportError(f"no report folders (*/design.yaml) under {folder}: the package "
                          "is incomplete; reinstall couchlog-agent")
    return designs


def _load_design(path: Path) -> DesignSpec:
    folder, name = path.parent, path.parent.name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    views = []
    for view_name, v in data["views"].items():
        key = v["key"]
        reduce = v.get("reduce")
        if reduce is not None and reduce not in BUILTIN_REDUCES:
            reduce = _source(folder / reduce)
        views.append(ViewSpec(
            design=name, name=view_name, about=v.get("about", ""), map=_source(folder / v["map"]),
            reduce=reduce, key=tuple(key) if isinstance(key, list) else (key,),
            key_is_array=isinstance(key, list), group_level=int(v.get("group_level", 0)),
            by=dict(v.get("by", {})), chart=bool(v.get("chart", False)),
            top=bool(v.get("top", False)), field_choice=bool(v.get("field", False))))
    return DesignSpec(name, data.get("language", "javascript"), tuple(views))


def _source(path: Path) -> str:
    # The file's text exactly, less the newline an editor adds at the end: the seed's functions
    # are one line each and must be stored byte for byte.
    return path.read_text(encoding="utf-8").removesuffix("\n")


def design_documents(folder: Path = REPORTS_DIR) -> dict[str, dict[str, Any]]:
    """The shipped design documents by `_id`, as CouchDB stores them (without `_rev`)."""
    return {doc["_id"]: doc for doc in (d.document() for d in load_designs(folder))}


def find_view(designs: Sequence[DesignSpec], name: str) -> ViewSpec:
    """A view by its name, or `design/view` when two designs share a name."""
    design_name, _, view_name = name.rpartition("/")
    found = [v for d in designs for v in d.views
             if v.name == view_name and design_name in ("", v.design)]
    if len(found) != 1:
        known = ", ".join(f"{v.design}/{v.name}" for d in designs for v in d.views)
        what = "no report" if not found else "more than one report"
        raise ReportError(f"{what} named {name!r}; reports: {known} (see `agent report --list`)",
                          usage=True)
    return found[0]


def same_document(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether the stored document already is `wanted`: compared without `_rev`, and
    attachments by name, type and digest, so an unchanged report is never rewritten."""
    if current is None:
        return False
    ours = {k: v for k, v in wanted.items() if k not in ("_rev", "_attachments")}
    theirs = {k: v for k, v in current.items() if k not in ("_rev", "_attachments")}
    return ours == theirs and _stubs(current) == _stubs(wanted)


def _stubs(doc: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    out = {}
    for name, att in doc.get("_attachments", {}).items():
        digest = att.get("digest") or "md5-" + base64.b64encode(
            hashlib.md5(base64.b64decode(att["data"])).digest()).decode()
        out[name] = (att.get("content_type", ""), digest)
    return out


def dashboard_document(folder: Path = DASHBOARD_DIR) -> dict[str, Any]:
    """`_design/dashboard`: the single-page app, every file of `folder` as an inline attachment."""
    attachments = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        attachments[name] = {"content_type": kind,
                             "data": base64.b64encode(path.read_bytes()).decode()}
    return {"_id": DASHBOARD_DOC, "language": "javascript", "_attachments": attachments}


# ---- planning a query (pure) ----

@dataclass(frozen=True, slots=True)
class Query:
    """What `agent report` asks of one view: one or more requests (one per key prefix when
    a time range is given and the key begins with something else)."""

    view: ViewSpec
    group_level: int | None
    reduce: bool
    since: datetime | None
    until: datetime | None
    until_precise: bool
    field_name: str | None
    top: int | None


def plan(view: ViewSpec, group_level: int | None = None, by: str | None = None,
         since: str | None = None, until: str | None = None, field_name: str | None = None,
         top: int | None = None) -> Query:
    """Check the options against the view's key layout; raise ReportError (usage) if they clash."""
    if by is not None:
        if by not in view.by:
            choices = ", ".join(view.by) or "none"
            raise ReportError(f"{view.name} cannot be grouped --by {by} (choices: {choices})",
                              usage=True)
        group_level = view.by[by]
    reduce = view.reduce is not None
    if group_level is not None and not reduce:
        raise ReportError(f"{view.name} has no reduce: --group-level/--by do not apply", usage=True)
    if reduce and group_level is None:
        group_level = view.group_level
    if group_level is not None and not 0 <= group_level <= len(view.key):
        raise ReportError(f"--group-level for {view.name} is 0 to {len(view.key)} "
                          f"(key {list(view.key)})", usage=True)
    if (since or until) and view.time_index is None:
        raise ReportError(f"{view.name} has no time in its key {list(view.key)}: "
                          "--since/--until do not apply", usage=True)
    if view.field_choice and not field_name:
        raise ReportError(f"{view.name} needs --field NAME (the field whose values to rank)",
                          usage=True)
    if field_name and not view.field_choice:
        raise ReportError(f"{view.name} takes no --field", usage=True)
    return Query(view, group_level, reduce, _parse_time(since, "--since"),
                 _parse_time(until, "--until"), until is not None and len(until) > 10,
                 field_name, top)


def _parse_time(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{flag} {text!r}: expected a date (2017-06-14) or a time "
                          "(2017-06-14T05, 2017-06-14 05:30)", usage=True) from None


def _time_key(parts: Sequence[str], when: datetime, end: bool, precise: bool) -> list[Any]:
    """The key parts that stand for `when`; at the end of a range a plain date covers its day."""
    out: list[Any] = []
    for part in parts:
        if part == "year":
            out.append(when.year)
        elif part == "month0":
            out.append(when.month - 1)
        elif part == "day":
            out.append(when.day)
        elif part == "date":
            out.append(when.date().isoformat())  # strftime drops a year's leading zeros
        elif part == "hour":
            out.append(f"{when.date().isoformat()}T{when.hour if precise or not end else 23:02d}")
        else:
            break
    return out


def requests(query: Query, prefixes: Sequence[Sequence[Any]] = ((),)) -> list[dict[str, str]]:
    """The view requests' parameters: one per key prefix (the parts before the time)."""
    view = query.view
    base: dict[str, Any] = {}
    if query.reduce:
        base["reduce"] = "true"
        if query.group_level is not None:
            base["group_level"] = str(query.group_level)
    elif view.reduce is not None:
        base["reduce"] = "false"
    if not query.reduce and query.top is not None:
        base["limit"] = str(query.top)
    if query.field_name is not None:
        base["startkey"] = [query.field_name]
        base["endkey"] = [query.field_name, {}]
    out = []
    index = view.time_index
    if index is None or (query.since is None and query.until is None):
        out.append(base)
    else:
        time_parts = view.key[index:]
        for prefix in prefixes:
            params = dict(base)
            # Without --since the range still starts at the first date, so documents without
            # one (a line shipped raw has no `date`: its key holds null there) stay out of it.
            start = list(prefix) + _time_key(time_parts, query.since or datetime(1, 1, 1),
                                             False, True)
            end = list(prefix) + (_time_key(time_parts, query.until, True, query.until_precise)
                                  if query.until else [])
            end_tail: Any = {} if view.key_is_array else "\ufff0"
            if view.key_is_array:
                params["startkey"], params["endkey"] = start, [*end, end_tail]
            else:
                params["startkey"] = start[0]
                params["endkey"] = (end[0] if end else "") + end_tail
            out.append(params)
    return [{k: v if isinstance(v, str) and k not in ("startkey", "endkey") else json.dumps(v)
             for k, v in p.items()} for p in out]


def needs_prefixes(query: Query) -> bool:
    """A time range over a key that begins with something else (the seed's machine) is run once
    per distinct prefix, which a group query over the prefix lists first."""
    index = query.view.time_index
    return bool(index) and (query.since is not None or query.until is not None)


def finish(query: Query, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows to show: with --top, the N largest values (a ranking view ranks by default)."""
    if query.reduce and (query.top is not None or query.view.top):
        rows = sorted(rows, key=lambda r: _number(r["value"]), reverse=True)
        if query.top is not None:
            rows = rows[:query.top]
    return rows


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


# ---- rendering (pure) ----

def render_json(rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([{"key": r.get("key"), "value": r.get("value")} for r in rows]) + "\n"


def _columns(view: ViewSpec, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return list(view.key)
    # Group level 0 has one row and no key: the table is just the value.
    width = max((len(r["key"]) if isinstance(r.get("key"), list) else int(r.get("key") is not None)
                 for r in rows), default=0)
    names = list(view.key[:width]) if view.key_is_array else [view.key[0]]
    return [*names, *(f"key{i}" for i in range(len(names), width))]


def _cells(view: ViewSpec, row: Mapping[str, Any], width: int) -> list[str]:
    key = row.get("key")
    parts = key if isinstance(key, list) else [key]
    if not view.key_is_array or width == 0:
        parts = [key] if width else []
    return [_text(p) for p in parts] + [""] * (width - len(parts))


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def expand_object(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A reduce that returns one object (the seed's per-IP counts) as one row per entry."""
    if len(rows) == 1 and isinstance(rows[0].get("value"), dict):
        return [{"key": [k], "value": v} for k, v in rows[0]["value"].items()]
    return [dict(r) for r in rows]


def render_csv(view: ViewSpec, rows: Sequence[Mapping[str, Any]]) -> str:
    columns = _columns(view, rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, "value"])
    for row in rows:
        writer.writerow([*_cells(view, row, len(columns)), _text(row.get("value"))])
    return out.getvalue()


def render_table(view: ViewSpec, rows: Sequence[Mapping[str, Any]], colour: bool,
                 bar_width: int = 40) -> str:
    """An aligned table; numeric values get a horizontal bar scaled to the largest."""
    if not rows:
        return "(no rows)\n"
    columns = [*_columns(view, rows), "value"]
    body = [[*_cells(view, r, len(columns) - 1), _text(r.get("value"))] for r in rows]
    widths = [max([len(c), *(len(line[i]) for line in body)]) for i, c in enumerate(columns)]
    numbers = [r.get("value") for r in rows]
    bars = all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers) and rows
    peak = max((_number(v) for v in numbers), default=0.0) or 1.0
    lines = ["  ".join(c.ljust(w) if i < len(columns) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(columns, widths, strict=True)))]
    for line, value in zip(body, numbers, strict=True):
        text = "  ".join(c.ljust(w) if i < len(line) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        if bars:
            bar = "█" * max(1 if _number(value) > 0 else 0, round(_number(value) / peak * bar_width))
            text += "  " + (f"\x1b[36m{bar}\x1b[0m" if colour else bar)
        lines.append(text.rstrip())
    return "\n".join(lines) + "\n"


def freshness(db_seq: Any, index_seq: Any) -> int | None:
    """How many updates the index is behind the database; sequences are opaque in CouchDB 3,
    but their numeric prefix counts updates, which is what this estimate uses."""
    a, b = _seq_number(db_seq), _seq_number(index_seq)
    if a is None or b is None:
        return None
    return max(0, a - b)


def _seq_number(seq: Any) -> int | None:
    if isinstance(seq, int):
        return seq
    if isinstance(seq, str):
        head = seq.split("-", 1)[0]
        return int(head) if head.isdigit() else None
    return None


# ---- the HTTP shell ----

class Couch:
    """Blocking calls to one CouchDB (or the front) as one user; the password never leaves
    the Authorization header, and errors name the URL without credentials."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None,
                 timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        if parts.username is not None:
            # Credentials in the URL (a config may hold them) go to the header, never to messages.
            user = user or unquote(parts.username)
            password = password if password is not None else unquote(parts.password or "")
            parts = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
        self.url = urlunsplit(parts).rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ReportError(f"cannot reach CouchDB at {self.url}: {reason}; check --url and "
                              "that the server runs") from None

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise ReportError(_refusal(status, body, f"GET {path.split('?')[0]}"))
        return body


def _refusal(status: int, body: Any, what: str) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    hint = {401: "give a reader's --user and --password-file", 403: "this user may not do that",
            404: "is the database right, and are the reports installed "
                 "(`agent report --install` as an admin)?"}.get(status, "")
    return f"{what} answered {status} {error or ''}".rstrip() + (f": {hint}" if hint else "")


def install_documents(couch: Couch, database: str, documents: Mapping[str, Mapping[str, Any]],
                      ) -> dict[str, str]:
    """Write each design document whose stored copy differs; return {id: "created" | "updated"
    | "unchanged"}. An unchanged one is not written, so its indexes are not rebuilt."""
    db = quote(database, safe="")
    outcome = {}
    for doc_id, wanted in documents.items():
        path = f"/{db}/{quote(doc_id, safe='/')}"
        status, current = couch.request("GET", path)
        if status == 404:
            current = None
        elif status != 200:
            raise ReportError(_refusal(status, current, f"GET {path}"))
        if same_document(current, wanted):
            outcome[doc_id] = "unchanged"
            continue
        body = dict(wanted)
        if current is not None:
            body["_rev"] = current["_rev"]
        status, answer = couch.request("PUT", path, body)
        if status not in (200, 201, 202):
            raise ReportError(_refusal(status, answer, f"PUT {path}") +
                              ("; installing reports needs a CouchDB admin" if status in (401, 403)
                               else ""))
        outcome[doc_id] = "created" if current is None else "updated"
    return outcome


def install_dashboard(couch: Couch, readers: Sequence[str] = ("couchlog_reader",)) -> str:
    """Create `couchlog_dashboard` (readable by the reader role) if missing, and write the app."""
    db = quote(DASHBOARD_DATABASE, safe="")
    status, body = couch.request("PUT", f"/{db}")
    if status in (201, 202):
        status, body = couch.request("PUT", f"/{db}/_security", {
            "admins": {"names": [], "roles": []},
            "members": {"names": [], "roles": list(readers)}})
    if status not in (200, 201, 202, 412):
        raise ReportError(_refusal(status, body, f"PUT /{db}") + "; this needs a CouchDB admin")
    # Attachments stored by CouchDB come back as stubs with digests, which same_document compares.
    outcome = install_documents(couch, DASHBOARD_DATABASE, {DASHBOARD_DOC: dashboard_document()})
    return outcome[DASHBOARD_DOC]


def run_query(couch: Couch, database: str, query: Query, stale: bool) -> list[dict[str, Any]]:
    """Run the view (once per key prefix when needed) and return the finished rows."""
    view = query.view
    path = f"/{quote(database, safe='')}/_design/{view.design}/_view/{view.name}"
    extra = {"stale": "ok"} if stale else {}
    prefixes: list[list[Any]] = [[]]
    if needs_prefixes(query):
        index = query.view.time_index or 0
        groups = couch.get(f"{path}?{urlencode({'reduce': 'true', 'group_level': index, **extra})}")
        prefixes = [row["key"] for row in groups["rows"]]
    rows: list[dict[str, Any]] = []
    for params in requests(query, prefixes):
        rows.extend(couch.get(f"{path}?{urlencode({**params, **extra})}")["rows"])
    return finish(query, rows)


def index_lag(couch: Couch, database: str, view: ViewSpec) -> int | None:
    """Updates the view's index is behind its database, or None where the server cannot say."""
    db = quote(database, safe="")
    status, info = couch.request("GET", f"/{db}/_design/{view.design}/_info")
    if status != 200 or not isinstance(info, dict):
        return None
    view_index = info.get("view_index")
    index_seq = view_index.get("update_seq") if isinstance(view_index, dict) else None
    return freshness(couch.get(f"/{db}").get("update_seq"), index_seq)


def list_reports(designs: Sequence[DesignSpec], installed: Mapping[str, Any] | None = None,
                 ) -> Iterator[str]:
    """One line per view: name, installed or not (when known), key layout and what it shows."""
    for design in designs:
        for view in design.views:
            state = ""
            if installed is not None:
                doc = installed.get(f"_design/{design.name}")
                state = ("installed " if doc is not None and view.name in doc.get("views", {})
                         else "missing   ")
            reduce = view.reduce if view.reduce in BUILTIN_REDUCES else (
                "custom" if view.reduce else "none")
            yield (f"{design.name}/{view.name:<16} {state}key {list(view.key)!s:<28} "
                   f"reduce {reduce:<7} {view.about}")


# ---- `agent report` ----

@dataclass(frozen=True, slots=True)
class Options:
    """`agent report`'s arguments, resolved by the CLI (the URL may come from the config)."""

    name: str | None
    url: str
    database: str | None
    user: str | None
    password: str | None
    install: bool = False
    dashboard: bool = False
    list_only: bool = False
    group_level: int | None = None
    by: str | None = None
    since: str | None = None
    until: str | None = None
    field_name: str | None = None
    top: int | None = None
    format: Format = "table"
    stale: bool = False
    colour: bool = False
    fleet_interval: float = fleet.INTERVAL
    """For `agent report fleet`: the agents' `fleet.interval` (a host is flagged after 3)."""


def command(options: Options, out: io.TextIOBase | Any, err: io.TextIOBase | Any) -> int:
    """Run `agent report`; return the exit code (0 done, 1 the server refused or failed)."""
    designs = load_designs()
    couch = Couch(options.url, options.user, options.password)
    if options.install or options.dashboard:
        if options.install:
            database = _need_database(options)
            for doc_id, what in install_documents(couch, database, design_documents()).items():
                print(f"{database}/{doc_id}: {what}", file=out)
        if options.dashboard:
            what = install_dashboard(couch)
            print(f"{DASHBOARD_DATABASE}/{DASHBOARD_DOC}: {what}", file=out)
        return 0
    if options.list_only:
        installed = None
        if options.database is not None:
            db = quote(options.database, safe="")
            installed = {}
            for design in designs:
                status, doc = couch.request("GET", f"/{db}/_design/{design.name}")
                if status == 200:
                    installed[doc["_id"]] = doc
        for line in list_reports(designs, installed):
            print(line, file=out)
        return 0
    if options.name is None:
        raise ReportError("name a report (`agent report --list` shows them)", usage=True)
    if options.name == FLEET_REPORT:
        return fleet_command(couch, options, out)
    view = find_view(designs, options.name)
    query = plan(view, options.group_level, options.by, options.since, options.until,
                 options.field_name, options.top)
    database = _need_database(options)
    rows = run_query(couch, database, query, options.stale)
    if options.stale:
        lag = index_lag(couch, database, view)
        state = ("the server does not say how fresh the index is" if lag is None else
                 "index up to date" if lag == 0 else f"index {lag} update(s) behind the database")
        print(f"agent report: --stale ok: answered from the existing index; {state}", file=err)
    if options.format == "json":
        out.write(render_json(rows))
    elif options.format == "csv":
        out.write(render_csv(view, _entries(query, rows)))
    else:
        out.write(render_table(view, _entries(query, rows), options.colour))
    return 0


def _entries(query: Query, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a table or CSV: an object-valued reduce becomes one row per entry, largest first."""
    entries = expand_object(rows)
    if entries != rows:
        entries.sort(key=lambda r: _number(r["value"]), reverse=True)
        if query.top is not None:
            entries = entries[:query.top]
    return entries


def _need_database(options: Options) -> str:
    if options.database is None:
        raise ReportError("which database? give --db log_NAME (or -c CONFIG whose sources "
                          "all ship to one database)", usage=True)
    return options.database


FLEET_REPORT = "fleet"
FLEET_COLUMNS = ("host", "last_seen", "health", "lag_bytes", "spool_documents", "spool_bytes",
                 "event", "version", "flag")


def fleet_rows(docs: Sequence[Mapping[str, Any]], now: float,
               interval: float) -> list[dict[str, Any]]:
    """One row per host from its fleet document, hosts gone quiet first, then by name. Pure."""
    quiet = fleet.stale_hosts(docs, now, interval)
    rows = []
    for doc in docs:
        updated = float(doc.get("updated_at") or 0)
        rows.append({
            "host": doc.get("host"), "last_seen": updated, "seen_ago": max(0.0, now - updated),
            "health": doc.get("health"), "lag_bytes": doc.get("bytes_behind", 0),
            "spool_documents": doc.get("spool_documents", 0),
            "spool_bytes": doc.get("spool_bytes", 0), "event": doc.get("event"),
            "version": doc.get("version"),
            "flag": (f"NOT SEEN for over {fleet.STALE_INTERVALS} intervals"
                     if doc.get("host") in quiet else
                     "stopped" if doc.get("event") == "stop" else ""),
        })
    return sorted(rows, key=lambda r: (not r["flag"].startswith("NOT SEEN"), str(r["host"])))


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def render_fleet(rows: Sequence[Mapping[str, Any]], fmt: Format) -> str:
    if fmt == "json":
        return json.dumps(list(rows), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(FLEET_COLUMNS)
        writer.writerows([_text(r[c]) for c in FLEET_COLUMNS] for r in rows)
        return buffer.getvalue()
    cells = [[_text(r["host"]), _ago(r["seen_ago"]), _text(r["health"]), _text(r["lag_bytes"]),
              _text(r["spool_documents"]), _text(r["spool_bytes"]), _text(r["event"]),
              _text(r["version"]), r["flag"]] for r in rows]
    head = ["HOST", "LAST SEEN", "HEALTH", "LAG BYTES", "SPOOLED", "SPOOL BYTES", "EVENT",
            "VERSION", "FLAG"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in (head, *cells)]
    return "\n".join(lines) + "\n"


def fleet_command(couch: Couch, options: Options, out: io.TextIOBase | Any) -> int:
    """`agent report fleet`: every host in couchlog_fleet, flagged when it went quiet."""
    body = couch.get(f"/{quote(fleet.DATABASE, safe='')}/_all_docs?include_docs=true")
    docs = [row["doc"] for row in body["rows"]
            if row["id"].startswith("host:") and isinstance(row.get("doc"), dict)]
    out.write(render_fleet(fleet_rows(docs, time.time(), options.fleet_interval), options.format))
    return 0
