"""Provisioning a CouchDB for couchlog: databases, users and roles, security, validation, settings.

Planning is pure: `plan(wanted, server, seen)` compares the wanted state with
what the server holds and returns the changes. `observe` reads the server (the
only GETs) and `apply` performs the changes (the only writes), so `--dry-run`
prints the plan and a second run plans nothing. Secrets (passwords, the
Authorization of the public writer) are never part of a change's summary.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from agent import fleet
from agent.config import DATABASE_NAME, AgentConfig, ConfigError, Problem, split_url

ROLE_AGENT = "couchlog_agent"
ROLE_PUBLIC = "couchlog_public"
ROLE_READER = "couchlog_reader"
WRITER_ROLES = (ROLE_AGENT, ROLE_PUBLIC)
DASHBOARD_DB = "couchlog_dashboard"
VALIDATION_DOC_ID = "_design/couchlog_validate"
PUBLIC_ID_PREFIX = "app."
"""Ids the public writer may choose itself. The agent's ids start with a source name, which
cannot contain a dot, so the two never meet."""

JsEngine = Literal["quickjs", "spidermonkey"]

# Writers only ever create. Any change to an existing document carries a `_rev`
# (in the body, or set from `?rev=`), and a create never does. A create of an id that
# exists (no `_rev`, `oldDoc` set) never reaches this function on CouchDB, which answers
# `conflict` first; pouchdb-server validates first, so it is let through to get the same
# `conflict` (that is how an agent's re-sent document counts as delivered).
# `_rev` in the new document is refused also because a
# `_bulk_docs {"new_edits": false}` write always carries one and can add a winning revision
# to an existing document, while `oldDoc` is null there (measured on CouchDB 3.5).
# The public writer (whose credentials nginx injects for anonymous POSTs) may only use ids
# CouchDB generated (32 hex digits; pouchdb-server makes UUIDs) or its own prefix, so it can
# never take an id the agent will use later (the agent would read the `conflict` as delivered).
# CouchDB refuses an `_id` that is no string before validating; pouchdb-server does not, and
# answered 500 with the function's stack trace.
VALIDATE_DOC_UPDATE = r"""function (newDoc, oldDoc, userCtx, secObj) {
  var roles = userCtx.roles || [];
  if (roles.indexOf('_admin') !== -1) { return; }
  var agent = roles.indexOf('couchlog_agent') !== -1;
  var writer = agent || roles.indexOf('couchlog_public') !== -1;
  if (!writer) {
    throw({forbidden: 'only couchlog_agent and couchlog_public users may write to this database'});
  }
  if (newDoc._rev) {
    throw({forbidden: 'writers may only create new documents: no _rev, no updates'});
  }
  if (newDoc._deleted) { throw({forbidden: 'writers may not delete documents'}); }
  if (newDoc._attachments) { throw({forbidden: 'writers may not add attachments'}); }
  var id = newDoc._id;
  if (typeof id !== 'string') { throw({forbidden: 'the _id must be a string'}); }
  if (!agent) {
    var generated = /^[0-9a-f]{32}$/.test(id) ||
      /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(id);
    if (!generated && id.indexOf('app.') !== 0) {
      throw({forbidden: 'public writes take a generated _id (POST without _id) or one starting with app.'});
    }
  }
}"""


def validation_document() -> dict[str, Any]:
    return {"_id": VALIDATION_DOC_ID, "language": "javascript",
            "validate_doc_update": VALIDATE_DOC_UPDATE}


def log_security() -> dict[str, Any]:
    return {"admins": {"names": [], "roles": []},
            "members": {"names": [], "roles": [ROLE_AGENT, ROLE_PUBLIC, ROLE_READER]}}


def fleet_security() -> dict[str, Any]:
    """Agents write their host's document (the design document says which), readers read."""
    return {"admins": {"names": [], "roles": []},
            "members": {"names": [], "roles": [ROLE_AGENT, ROLE_READER]}}


def dashboard_security() -> dict[str, Any]:
    return {"admins": {"names": [], "roles": []},
            "members": {"names": [], "roles": [ROLE_READER]}}


class SetupError(Exception):
    """The server refused or could not be reached; the message says where and what to do."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password: str
    role: str

    @property
    def path(self) -> str:
        return "/_users/" + quote(f"org.couchdb.user:{self.name}", safe=":")


@dataclass(frozen=True, slots=True)
class Replication:
    """Continuous copies of every log database to `target` (a server URL without credentials)."""

    target: str
    target_auth: tuple[str, str] | None
    source: str
    source_auth: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Wanted:
    databases: tuple[str, ...]
    users: tuple[User, ...] = ()
    shards: int | None = None
    replicas: int | None = None
    js_engine: JsEngine = "quickjs"
    replication: Replication | None = None
    design_documents: tuple[dict[str, Any], ...] = ()
    """Installed in every log database, besides the validation document."""
    dashboard_documents: tuple[dict[str, Any], ...] = ()
    """Installed in `couchlog_dashboard`."""


@dataclass(frozen=True, slots=True)
class Server:
    """What feature detection found: CouchDB 3 has all of it, pouchdb-server little."""

    version: tuple[int, int] | None
    """Apache CouchDB's version; None for another server speaking its API."""
    config_api: bool
    nodes: tuple[str, ...]
    replicator: bool
    scheduler: bool


@dataclass(frozen=True, slots=True)
class Change:
    method: str
    path: str
    body: Any
    summary: str
    """What it does, for people: never a secret."""


@dataclass(slots=True)
class Plan:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What could not be done on this server and why (printed as warnings)."""


Seen = dict[str, Any]
"""Path → the JSON the server holds there (None if missing); `password_ok:NAME` → bool."""


# -- the pure part


def db_path(db: str) -> str:
    return "/" + quote(db, safe="")


def replication_doc_id(db: str) -> str:
    return f"couchlog-{db}"


def config_settings(server: Server, js_engine: JsEngine) -> list[tuple[str, str, str]]:
    settings = [("chttpd", "require_valid_user", "true"),
                ("chttpd", "require_valid_user_except_for_up", "true"),
                ("query_server_config", "reduce_limit", "false")]
    if server.version is not None and server.version >= (3, 4):
        settings.append(("couchdb", "js_engine", js_engine))
    return settings


def system_databases(server: Server) -> tuple[str, ...]:
    """What CouchDB 3 needs and creates only in single-node mode or when a cluster is finished:
    without `_users` no user can log in."""
    return ("_users", "_replicator") if server.version is not None else ()


def paths_to_observe(wanted: Wanted, server: Server) -> list[str]:
    """Everything `plan` compares, so `observe` can fetch exactly that."""
    paths: list[str] = [db_path(db) for db in system_databases(server)]
    for db in wanted.databases:
        paths += [db_path(db), db_path(db) + "/_security", db_path(db) + "/" + VALIDATION_DOC_ID]
        paths += [db_path(db) + "/" + doc["_id"] for doc in wanted.design_documents]
        if wanted.replication is not None and (server.replicator or server.version is not None):
            paths.append("/_replicator/" + quote(replication_doc_id(db), safe=""))
    paths += [db_path(DASHBOARD_DB), db_path(DASHBOARD_DB) + "/_security"]
    paths += [db_path(DASHBOARD_DB) + "/" + doc["_id"] for doc in wanted.dashboard_documents]
    paths += [db_path(fleet.DATABASE), db_path(fleet.DATABASE) + "/_security",
              db_path(fleet.DATABASE) + "/" + fleet.DESIGN["_id"]]
    paths += [user.path for user in wanted.users]
    if server.config_api:
        for node in server.nodes:
            for section, key, _ in config_settings(server, wanted.js_engine):
                paths.append(config_path(node, section, key))
    return paths


def config_path(node: str, section: str, key: str) -> str:
    return f"/_node/{quote(node, safe='')}/_config/{section}/{key}"


def plan(wanted: Wanted, server: Server, seen: Seen) -> Plan:
    """The changes that bring the server to `wanted`; none when it is there already."""
    result = Plan()
    changes = result.changes
    query = "&".join(f"{k}={v}" for k, v in (("q", wanted.shards), ("n", wanted.replicas)) if v)
    for db in system_databases(server):
        if seen.get(db_path(db)) is None:
            changes.append(Change("PUT", db_path(db), None, f"create system database {db}"))
    for db in (*wanted.databases, DASHBOARD_DB, fleet.DATABASE):
        if seen.get(db_path(db)) is None:
            changes.append(Change("PUT", db_path(db) + (f"?{query}" if query else ""), None,
                                  f"create database {db}"))
    for user in wanted.users:
        change = plan_user(user, seen.get(user.path), bool(seen.get(f"password_ok:{user.name}")))
        if change is not None:
            changes.append(change)
    for db in wanted.databases:
        base = db_path(db)
        if seen.get(base + "/_security") != log_security():
            changes.append(Change("PUT", base + "/_security", log_security(),
                                  f"set _security of {db}: members are the couchlog roles"))
        for doc in (validation_document(), *wanted.design_documents):
            change = plan_document(db, doc, seen.get(f"{base}/{doc['_id']}"))
            if change is not None:
                changes.append(change)
    if seen.get(db_path(DASHBOARD_DB) + "/_security") != dashboard_security():
        changes.append(Change("PUT", db_path(DASHBOARD_DB) + "/_security", dashboard_security(),
                              f"set _security of {DASHBOARD_DB}: {ROLE_READER} may read"))
    for doc in wanted.dashboard_documents:
        change = plan_document(DASHBOARD_DB, doc, seen.get(f"{db_path(DASHBOARD_DB)}/{doc['_id']}"))
        if change is not None:
            changes.append(change)
    fleet_base = db_path(fleet.DATABASE)
    if seen.get(fleet_base + "/_security") != fleet_security():
        changes.append(Change("PUT", fleet_base + "/_security", fleet_security(),
                              f"set _security of {fleet.DATABASE}: {ROLE_AGENT} writes its "
                              f"host's document, {ROLE_READER} reads"))
    change = plan_document(fleet.DATABASE, fleet.DESIGN,
                           seen.get(f"{fleet_base}/{fleet.DESIGN['_id']}"))
    if change is not None:
        changes.append(change)
    _plan_config(wanted, server, seen, result)
    _plan_replication(wanted, server, seen, result)
    return result


def plan_user(user: User, current: Any, password_ok: bool) -> Change | None:
    if current is None:
        body = {"_id": f"org.couchdb.user:{user.name}", "name": user.name, "type": "user",
                "roles": [user.role], "password": user.password}
        return Change("PUT", user.path, body, f"create user {user.name} with role {user.role}")
    roles = list(current.get("roles") or [])
    wanted = roles if user.role in roles else [*roles, user.role]
    if user.role == ROLE_PUBLIC:
        # nginx gives this login to every anonymous client: so would any other role it held
        # (couchlog_agent would let anyone pre-empt the agent's ids, couchlog_reader read).
        wanted = [ROLE_PUBLIC]
    if roles == wanted and password_ok:
        return None
    body = {**current, "roles": wanted, "password": user.password}
    dropped = [role for role in roles if role not in wanted]
    what = ("its password" if roles == wanted else f"role {user.role}" if not dropped
            else f"roles {', '.join(wanted)} only (it had {', '.join(roles)})")
    return Change("PUT", user.path, body, f"update user {user.name}: {what}")


def plan_document(db: str, doc: dict[str, Any], current: Any) -> Change | None:
    """A PUT if `current` differs from `doc` (its `_rev` and attachment stubs aside)."""
    if current is not None and _same_document(doc, current):
        return None
    body = dict(doc)
    verb = "install"
    if current is not None:
        body["_rev"] = current["_rev"]
        verb = "update"
    return Change("PUT", f"{db_path(db)}/{doc['_id']}", body, f"{verb} {doc['_id']} in {db}")


def _same_document(doc: dict[str, Any], current: dict[str, Any]) -> bool:
    mine = {k: v for k, v in doc.items() if k not in ("_rev", "_attachments")}
    theirs = {k: v for k, v in current.items() if k not in ("_rev", "_attachments")}
    if mine != theirs:
        return False
    return _digests(doc.get("_attachments") or {}) == {
        name: stub.get("digest") for name, stub in (current.get("_attachments") or {}).items()}


def _digests(attachments: dict[str, Any]) -> dict[str, str]:
    """CouchDB's digest of each inline attachment (`md5-` and the base64 of the MD5)."""
    result = {}
    for name, attachment in attachments.items():
        md5 = hashlib.md5(base64.b64decode(attachment.get("data", "")), usedforsecurity=False)
        result[name] = "md5-" + base64.b64encode(md5.digest()).decode("ascii")
    return result


def _plan_config(wanted: Wanted, server: Server, seen: Seen, result: Plan) -> None:
    if not server.config_api:
        result.notes.append(
            "this server has no /_node/{node}/_config API (not Apache CouchDB 3): "
            "require_valid_user, reduce_limit and js_engine were not set; set them in the "
            "server's configuration if it has such settings")
        return
    for node in server.nodes:
        for section, key, value in config_settings(server, wanted.js_engine):
            path = config_path(node, section, key)
            if seen.get(path) != value:
                result.changes.append(Change("PUT", path, value,
                                             f"set [{section}] {key} = {value} on {node}"))


def _plan_replication(wanted: Wanted, server: Server, seen: Seen, result: Plan) -> None:
    replication = wanted.replication
    if replication is None:
        return
    if not server.replicator and "_replicator" not in system_databases(server):
        result.notes.append("this server has no _replicator database: no replication "
                            "documents written")
        return
    for db in wanted.databases:
        doc = replication_document(replication, db)
        path = "/_replicator/" + quote(doc["_id"], safe="")
        current = seen.get(path)
        if current is not None and all(current.get(k) == v for k, v in doc.items()):
            continue
        body = doc if current is None else {**doc, "_rev": current["_rev"]}
        verb = "write" if current is None else "rewrite"
        result.changes.append(Change("PUT", path, body, f"{verb} _replicator/{doc['_id']}: "
                                     f"{db} -> {replication.target}/{db}, continuous"))


def replication_document(replication: Replication, db: str) -> dict[str, Any]:
    def end(url: str, auth: tuple[str, str] | None) -> dict[str, Any]:
        endpoint: dict[str, Any] = {"url": f"{url}/{quote(db, safe='')}"}
        if auth is not None:
            endpoint["auth"] = {"basic": {"username": auth[0], "password": auth[1]}}
        return endpoint

    return {"_id": replication_doc_id(db), "source": end(replication.source, replication.source_auth),
            "target": end(replication.target, replication.target_auth),
            "continuous": True, "create_target": True}


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """A URL without its user and password, and those (None if it had none).

    ValueError, with the credentials redacted, for what is no http(s) base URL: urllib's own
    error would quote a piece of a password holding `/`, `?` or `#` (as a port)."""
    split = split_url(url)
    if split.username is None:
        return split.url, None
    return split.url, (split.username, split.password or "")


def _split_option(url: str, where: str, flag: str,
                  problems: list[Problem]) -> tuple[str, tuple[str, str] | None]:
    try:
        return split_credentials(url)
    except ValueError as exc:
        problems.append(Problem(where, flag, str(exc)))
        return "", None


# -- the I/O shell


class Client:
    """A small synchronous CouchDB client for the CLI, with the admin's Basic auth."""

    def __init__(self, url: str, auth: tuple[str, str] | None, ca_file: Path | None = None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def request(self, method: str, path: str, body: Any = None,
                auth: tuple[str, str] | Literal["admin"] | None = "admin") -> tuple[int, Any]:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        credentials = self.auth if auth == "admin" else auth
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as answer:
                return answer.status, _json(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SetupError(f"cannot reach {self.url}: {reason}; check --url and that CouchDB "
                             "is running") from None

    def get(self, path: str) -> Any:
        """The JSON at `path`, or None if it is missing (404)."""
        status, body = self.request("GET", path)
        if status == 404:
            return None
        if status in (401, 403):
            raise SetupError(f"GET {path} on {self.url}: HTTP {status} {_error(body)}; "
                             "give a server admin with --admin and its password")
        if status != 200:
            raise SetupError(f"GET {path} on {self.url}: HTTP {status} {_error(body)}")
        return body


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload or b"null")
    except ValueError:
        return {"error": payload[:200].decode("utf-8", "replace")}


def _error(body: Any) -> str:
    return str(body.get("error", "")) if isinstance(body, dict) else ""


_VERSION = re.compile(r"(\d+)\.(\d+)")


def detect(client: Client) -> Server:
    root = client.get("/") or {}
    version = None
    if isinstance(root, dict) and "couchdb" in root:
        match = _VERSION.match(str(root.get("version", "")))
        if match:
            version = (int(match[1]), int(match[2]))
    status, _ = client.request("GET", "/_node/_local/_config/couchdb/uuid")
    config_api = status == 200
    membership = client.get("/_membership") if config_api else None
    nodes = tuple(membership.get("cluster_nodes", ())) if isinstance(membership, dict) else ()
    if config_api and not nodes:
        nodes = ("_local",)
    replicator = client.request("GET", "/_replicator")[0] == 200
    scheduler = client.request("GET", "/_scheduler/docs")[0] == 200
    return Server(version, config_api, nodes, replicator, scheduler)


def observe(client: Client, wanted: Wanted, server: Server) -> Seen:
    seen: Seen = {path: client.get(path) for path in paths_to_observe(wanted, server)}
    for user in wanted.users:
        # A server admin has no user document: the public writer is asked even without one.
        if seen.get(user.path) is not None or user.role == ROLE_PUBLIC:
            status, body = client.request("GET", "/_session", auth=(user.name, user.password))
            context = (body.get("userCtx") or {}) if isinstance(body, dict) else {}
            logged_in = status == 200 and context.get("name") == user.name
            if logged_in and user.role == ROLE_PUBLIC and "_admin" in (context.get("roles") or []):
                raise SetupError(f"{user.name} is a server admin: nginx would give its login to "
                                 "every anonymous client; choose another --public-user")
            if seen.get(user.path) is not None:
                seen[f"password_ok:{user.name}"] = logged_in
    return seen


class Raced(SetupError):
    """The server changed between observing and applying (another `agent setup`, say)."""


def apply(client: Client, changes: Iterable[Change], applied: list[Change] | None = None) -> None:
    """Make each change in turn, adding it to `applied` once made."""
    for change in changes:
        status, body = client.request(change.method, change.path, change.body)
        if status not in (200, 201, 202):
            error = Raced if status in (409, 412) else SetupError
            raise error(f"{change.summary}: {change.method} {change.path.split('?')[0]} "
                        f"answered HTTP {status} {_error(body)}")
        if applied is not None:
            applied.append(change)


def provision(client: Client, wanted: Wanted, dry_run: bool = False) -> Plan:
    """Detect, observe, plan and (unless `dry_run`) apply; return what was (or would be) done.

    A conflict (a database or document that appeared since it was observed, as when two setups
    run at once) makes it observe and plan again, as long as each plan is shorter than the one
    before: what the other run did is not redone, and a server that keeps changing ends it."""
    server = detect(client)
    applied: list[Change] = []
    before: int | None = None
    while True:
        result = plan(wanted, server, observe(client, wanted, server))
        if dry_run:
            return result
        try:
            apply(client, result.changes, applied)
        except Raced:
            if before is not None and len(result.changes) >= before:
                raise
            before = len(result.changes)
            continue
        result.changes = applied
        return result


def install_design_documents(client: Client, db: str, docs: Sequence[dict[str, Any]],
                             dry_run: bool = False) -> list[Change]:
    """Install each design document in `db` unless it is there already, unchanged."""
    changes = [change for doc in docs
               if (change := plan_document(db, doc, client.get(f"{db_path(db)}/{doc['_id']}")))]
    if not dry_run:
        apply(client, changes)
    return changes


def replication_status(client: Client, server: Server) -> list[str]:
    """One line per couchlog replication: its database and state."""
    if server.scheduler:
        body = client.get("/_scheduler/docs/_replicator") or {}
        return [f"{doc.get('doc_id')}: {doc.get('state')} {doc.get('info') or ''}".rstrip()
                for doc in body.get("docs", []) if str(doc.get("doc_id", "")).startswith("couchlog-")]
    if not server.replicator:
        return []
    rows = (client.get("/_replicator/_all_docs?include_docs=true") or {}).get("rows", [])
    return [f"{row['id']}: {row['doc'].get('_replication_state', 'unknown')}"
            for row in rows if row["id"].startswith("couchlog-")]


# -- the nginx front


NGINX_TEMPLATE = Path(__file__).resolve().parent.parent / "nginx" / "couchlog.conf.template"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_NGINX_SIZE = re.compile(r"\d+[kKmMgGs]?")
_NGINX_RATE = re.compile(r"\d+r/[sm]")
_NGINX_WORD = re.compile(r"[A-Za-z0-9._:\[\]/-]+")


@dataclass(frozen=True, slots=True)
class Front:
    """What the nginx template needs; `render_nginx` fills it in."""

    server_name: str
    cert: str
    key: str
    upstreams: tuple[str, ...]
    """host:port of each CouchDB node."""
    public_user: str
    public_password: str
    bind: str = ""
    http_port: int = 80
    https_port: int = 443
    max_body_size: str = "16m"
    write_rate: str = "100r/s"
    write_burst: int = 200
    read_timeout: str = "300s"


def render_nginx(template: str, front: Front) -> str:
    """The template with every `{{name}}` filled in; ValueError names a value nginx would misread."""
    for name, value, pattern in (("server name", front.server_name, _NGINX_WORD),
                                 ("certificate", front.cert, _NGINX_WORD),
                                 ("key", front.key, _NGINX_WORD),
                                 *((("bind address", front.bind, _NGINX_WORD),) if front.bind else ()),
                                 ("max body size", front.max_body_size, _NGINX_SIZE),
                                 ("write rate", front.write_rate, _NGINX_RATE),
                                 ("read timeout", front.read_timeout, _NGINX_SIZE),
                                 *(("upstream", u, _NGINX_WORD) for u in front.upstreams)):
        if not pattern.fullmatch(value):
            raise ValueError(f"{name} {value!r} cannot go into nginx's configuration as it is")
    if not front.upstreams:
        raise ValueError("no upstream CouchDB: give --upstream HOST:PORT or --url")
    token = base64.b64encode(f"{front.public_user}:{front.public_password}".encode()).decode()
    values = {
        "upstream_servers": "\n".join(f"    server {u};" for u in front.upstreams),
        "listen_prefix": f"{front.bind}:" if front.bind else "",
        "http_port": str(front.http_port), "https_port": str(front.https_port),
        "https_port_suffix": "" if front.https_port == 443 else f":{front.https_port}",
        "server_name": front.server_name, "cert": front.cert, "key": front.key,
        "max_body_size": front.max_body_size, "write_rate": front.write_rate,
        "write_burst": str(front.write_burst), "read_timeout": front.read_timeout,
        "public_authorization": f"Basic {token}",
    }

    def fill(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise ValueError(f"the nginx template asks for {{{{{match[1]}}}}}, which setup "
                             "does not know")
        return values[match[1]]

    return _PLACEHOLDER.sub(fill, template)


# -- the command line


def command(args: argparse.Namespace, config: AgentConfig | None,
            design_documents: Sequence[dict[str, Any]] = (),
            dashboard_documents: Sequence[dict[str, Any]] = ()) -> int:
    """`agent setup`: 0 done (or nothing to do), 1 the server refused or failed."""
    problems: list[Problem] = []
    url = args.url or (config.couchdb.urls[0] if config and config.couchdb.urls else None)
    if args.nginx:
        return _nginx(args, url, problems)
    if url is None:
        raise ConfigError([Problem("agent setup", "--url", "give --url or -c CONFIG with couchdb.url")])
    bare, url_auth = _split_option(url, "agent setup", "--url", problems)
    if problems:
        raise ConfigError(problems)
    if not args.url:
        url_auth = None  # the config's URL carries the agent's login, not an admin's
    admin = url_auth or (args.admin, _admin_password(args, problems))
    replication = _replication(args, bare, admin, problems)
    users = _users(args, config, problems)
    databases = tuple(dict.fromkeys(args.db or (s.database for s in (config.sources if config else ()))))
    for db in databases:
        # `_users` or `_replicator` would get the log databases' members and validation.
        if not DATABASE_NAME.fullmatch(db) or db == DASHBOARD_DB:
            problems.append(Problem("agent setup", "--db", f"{db!r} is not a log database name: "
                                    "lowercase letters, digits and _$()+/-, starting with a letter"))
    if not databases and not args.replication_status:
        problems.append(Problem("agent setup", "--db", "no database: give --db NAME or -c CONFIG "
                                "with sources"))
    if problems:
        raise ConfigError(problems)
    client = Client(bare, admin, args.ca_file)
    try:
        if args.replication_status:
            server = detect(client)
            if not server.scheduler:
                print("agent setup: this server has no _scheduler API; states below come from "
                      "the _replicator documents", file=sys.stderr)
            lines = replication_status(client, server)
            print("\n".join(lines) if lines else "no couchlog replications")
            return 0
        wanted = Wanted(databases, users, args.shards, args.replicas, args.js_engine, replication,
                        tuple(design_documents), tuple(dashboard_documents))
        result = provision(client, wanted, dry_run=args.dry_run)
    except SetupError as exc:
        print(f"agent setup: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"agent setup: warning: {note}", file=sys.stderr)
    prefix = "would " if args.dry_run else ""
    for change in result.changes:
        print(f"{prefix}{change.summary}")
    if not result.changes:
        print(f"nothing to change: {bare} is set up for {', '.join(databases)}")
    elif args.dry_run:
        print(f"dry run: {len(result.changes)} change(s) not made")
    return 0


def _read_secret(path: Path, flag: str, problems: list[Problem]) -> str:
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        reason = "it is empty" if isinstance(exc, IndexError) else str(exc)
        problems.append(Problem(path, flag, f"cannot read the password: {reason}"))
        return ""


def _admin_password(args: argparse.Namespace, problems: list[Problem]) -> str:
    if args.admin_password_file is not None:
        return _read_secret(args.admin_password_file, "--admin-password-file", problems)
    if "COUCHLOG_ADMIN_PASSWORD" in os.environ:
        return os.environ["COUCHLOG_ADMIN_PASSWORD"]
    if sys.stdin.isatty():
        return getpass.getpass(f"password of CouchDB admin {args.admin}: ")
    problems.append(Problem("agent setup", "--admin-password-file", "no admin password: give "
                            "--admin-password-file, set COUCHLOG_ADMIN_PASSWORD, or run on a terminal"))
    return ""


def _users(args: argparse.Namespace, config: AgentConfig | None,
           problems: list[Problem]) -> tuple[User, ...]:
    users = []
    if args.agent_user is not None:
        if args.agent_password_file is None:
            problems.append(Problem("agent setup", "--agent-password-file", "needed with --agent-user"))
        else:
            users.append(User(args.agent_user, _read_secret(args.agent_password_file,
                                                             "--agent-password-file", problems),
                              ROLE_AGENT))
    elif config is not None:
        name, password = config.couchdb.username, config.couchdb.password
        if name is None and config.couchdb.urls:
            name, password = split_credentials(config.couchdb.urls[0])[1] or (None, None)
        if name is not None and password is not None:
            users.append(User(name, password, ROLE_AGENT))
    if args.public_password_file is not None:
        users.append(User(args.public_user, _read_secret(args.public_password_file,
                                                          "--public-password-file", problems),
                          ROLE_PUBLIC))
    if args.reader_password_file is not None:
        users.append(User(args.reader, _read_secret(args.reader_password_file,
                                                     "--reader-password-file", problems),
                          ROLE_READER))
    names = [user.name for user in users]
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        # One login with two roles: the public writer's would give anonymous clients the other.
        problems.append(Problem("agent setup", "--public-user", f"user {name!r} is named for more "
                                "than one role (agent, public writer, reader): give each its own"))
    return tuple(users)


def _replication(args: argparse.Namespace, source: str, admin: tuple[str, str],
                 problems: list[Problem]) -> Replication | None:
    if args.replicate_to is None:
        return None
    target, auth = _split_option(args.replicate_to, "agent setup", "--replicate-to", problems)
    if args.replicate_password_file is not None:
        if auth is None:
            problems.append(Problem("agent setup", "--replicate-to", "put the user in the URL "
                                    "(https://USER@host) to go with --replicate-password-file"))
        else:
            auth = (auth[0], _read_secret(args.replicate_password_file, "--replicate-password-file",
                                          problems))
    source_auth = admin
    if args.reader_password_file is not None:
        # The reader may read every log database: the copy needs no more than that.
        source_auth = (args.reader, _read_secret(args.reader_password_file,
                                                 "--reader-password-file", problems))
    return Replication(target, auth, source, source_auth)


def _nginx(args: argparse.Namespace, url: str | None, problems: list[Problem]) -> int:
    for flag, value in (("--cert", args.cert), ("--key", args.key),
                        ("--public-password-file", args.public_password_file)):
        if value is None:
            problems.append(Problem("agent setup --nginx", flag, "required with --nginx"))
    upstreams = list(args.upstream)
    if not upstreams and url is not None:
        parts = urlsplit(_split_option(url, "agent setup --nginx", "--url", problems)[0])
        upstreams = [f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"]
    password = ("" if args.public_password_file is None else
                _read_secret(args.public_password_file, "--public-password-file", problems))
    try:
        template = (args.template or NGINX_TEMPLATE).read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(Problem(args.template or NGINX_TEMPLATE, "--template",
                                f"cannot read it: {exc.strerror}"))
    if problems:
        raise ConfigError(problems)
    front = Front(args.server_name, args.cert, args.key, tuple(upstreams), args.public_user,
                  password, args.bind, args.http_port, args.https_port, args.max_body_size)
    try:
        text = render_nginx(template, front)
    except ValueError as exc:
        raise ConfigError([Problem("agent setup --nginx", "", str(exc))]) from None
    if args.output is None:
        sys.stdout.write(text)
    elif args.dry_run:
        print(f"would write {args.output} (readable by its owner only)")
    else:
        # The file holds the public writer's credentials: readable by its owner only.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # The mode above applies only to a new file: a file rendered before may be readable.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    return 0
