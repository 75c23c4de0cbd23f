"""`agent setup` against the test backend (or CouchDB 3 with COUCHDB_URL): idempotent, dry-run,
replication documents, the config API, and no secret in its output."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml

from tests.agentproc import write_config
from tests.backendsetup import Account, account, delete_users, run_agent
from tests.couch import CouchDB

pytestmark = pytest.mark.integration


class Scene:
    """Two log databases from a config's sources, an agent user, a public writer and a reader."""

    def __init__(self, folder: Path, couchdb_url: str) -> None:
        self.url = couchdb_url
        parts = urlsplit(couchdb_url)
        self.bare_url = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        self.admin = (parts.username or "", parts.password or "")
        self.dbs = [f"log_setup_{secrets.token_hex(4)}", f"log_setup_{secrets.token_hex(4)}"]
        self.agent, self.public, self.reader = (account(folder / "secrets", p)
                                                for p in ("agent", "public", "reader"))
        self.config = write_config(
            folder / "etc", "http://127.0.0.1:9", [
                {"name": f"s{i}", "paths": [str(folder / f"{i}.log")], "database": db,
                 "schema": "$msg..."} for i, db in enumerate(self.dbs)],
            couchdb={"username": self.agent.name, "password": self.agent.password})

    def setup(self, *extra: str) -> Any:
        return run_agent("setup", "-c", str(self.config), "--url", self.url,
                         "--public-user", self.public.name,
                         "--public-password-file", str(self.public.password_file),
                         "--reader", self.reader.name,
                         "--reader-password-file", str(self.reader.password_file), *extra)

    @property
    def accounts(self) -> tuple[Account, ...]:
        return self.agent, self.public, self.reader

    def secrets(self) -> list[str]:
        return [a.password for a in self.accounts] + [self.admin[1]]


@pytest.fixture
def scene(tmp_path: Path, couchdb_url: str, couch: CouchDB) -> Iterator[Scene]:
    made = Scene(tmp_path, couchdb_url)
    yield made
    for db in made.dbs:
        couch.delete_db(db)
    delete_users(couch, *(a.name for a in made.accounts))


def snapshot(couch: CouchDB, scene: Scene) -> dict[str, Any]:
    """Everything setup writes for these databases and users, revisions included."""
    paths = [f"/_users/org.couchdb.user:{a.name}" for a in scene.accounts]
    for db in scene.dbs:
        paths += [f"/{db}", f"/{db}/_security", f"/{db}/_design/couchlog_validate",
                  f"/{db}/_design/report", f"/{db}/_design/couchlog"]
    paths += ["/couchlog_dashboard/_security", "/couchlog_dashboard/_design/dashboard"]
    paths += ["/couchlog_fleet/_security", "/couchlog_fleet/_design/couchlog_fleet"]
    result = {}
    for path in paths:
        status, body = couch.request("GET", path)
        if isinstance(body, dict):
            # Database info moves by itself (sizes, instance start time); its update_seq does not.
            body = {k: v for k, v in body.items() if k in ("_rev", "update_seq", "members", "admins",
                                                           "roles", "validate_doc_update", "db_name")}
        result[path] = (status, body)
    return result


def test_second_setup_changes_nothing(scene: Scene, couch: CouchDB) -> None:
    first = scene.setup()
    assert first.returncode == 0, first.stderr
    for db in scene.dbs:
        assert f"create database {db}" in first.stdout
    assert f"create user {scene.agent.name} with role couchlog_agent" in first.stdout
    before = snapshot(couch, scene)
    assert all(status == 200 for status, _ in before.values()), before
    second = scene.setup()
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("nothing to change"), second.stdout
    assert snapshot(couch, scene) == before
    for secret in scene.secrets():
        assert secret not in first.stdout + first.stderr + second.stdout + second.stderr


def test_setup_repairs_what_was_changed_by_hand(scene: Scene, couch: CouchDB) -> None:
    assert scene.setup().returncode == 0
    db = scene.dbs[0]
    assert couch.request("PUT", f"/{db}/_security", {"members": {"names": [], "roles": []}})[0] == 200
    _, user = couch.request("GET", f"/_users/org.couchdb.user:{scene.agent.name}")
    assert couch.request("PUT", f"/_users/org.couchdb.user:{scene.agent.name}",
                         {**user, "password": "changed"})[0] == 201
    again = scene.setup()
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"update user {scene.agent.name}: its password",
                                         f"set _security of {db}: members are the couchlog roles"]
    assert couch.request("GET", f"/{db}/_security")[1]["members"]["roles"] == [
        "couchlog_agent", "couchlog_public", "couchlog_reader"]


def test_dry_run_changes_nothing(scene: Scene, couch: CouchDB) -> None:
    dry = scene.setup("--dry-run")
    assert dry.returncode == 0, dry.stderr
    for db in scene.dbs:
        assert f"would create database {db}" in dry.stdout
        assert couch.request("GET", f"/{db}")[0] == 404
    assert "dry run:" in dry.stdout
    for a in scene.accounts:
        assert couch.request("GET", f"/_users/org.couchdb.user:{a.name}")[0] == 404
    assert scene.setup().returncode == 0
    before = snapshot(couch, scene)
    dry_again = scene.setup("--dry-run")
    assert dry_again.stdout.startswith("nothing to change"), dry_again.stdout
    assert snapshot(couch, scene) == before


def test_replicate_to_writes_one_document_per_database(scene: Scene, couch: CouchDB,
                                                       tmp_path: Path) -> None:
    if couch.request("GET", "/_replicator")[0] != 200:
        done = scene.setup("--replicate-to", "http://backup@127.0.0.1:9")
        assert done.returncode == 0 and "no _replicator database" in done.stderr
        return
    target_password = tmp_path / "target.password"
    target_password.write_text("target-secret\n")
    # An unreachable target: the documents are what is checked, not the copy itself.
    args = ("--replicate-to", "http://backup@127.0.0.1:9", "--replicate-password-file",
            str(target_password))
    first = scene.setup(*args)
    assert first.returncode == 0, first.stderr
    ids = [f"couchlog-{db}" for db in scene.dbs]
    try:
        docs = {i: couch.request("GET", f"/_replicator/{i}")[1] for i in ids}
        for db in scene.dbs:
            doc = docs[f"couchlog-{db}"]
            assert doc["continuous"] is True
            assert doc["source"]["url"].endswith(f"/{db}")
            assert doc["target"]["url"] == f"http://127.0.0.1:9/{db}"
            assert doc["target"]["auth"]["basic"] == {"username": "backup",
                                                      "password": "target-secret"}
        _, rows = couch.request("GET", "/_replicator/_all_docs")
        assert sum(row["id"] in ids for row in rows["rows"]) == len(scene.dbs)
        second = scene.setup(*args)
        assert second.returncode == 0 and second.stdout.startswith("nothing to change"), second
        assert {i: couch.request("GET", f"/_replicator/{i}")[1]["_rev"] for i in ids} == {
            i: doc["_rev"] for i, doc in docs.items()}
        output = first.stdout + first.stderr + second.stdout + second.stderr
        for secret in [*scene.secrets(), "target-secret"]:
            assert secret not in output
        status = scene.setup("--replication-status")
        assert status.returncode == 0
        for i in ids:
            assert i in status.stdout
    finally:
        for i in ids:
            code, doc = couch.request("GET", f"/_replicator/{i}")
            if code == 200:
                couch.request("DELETE", f"/_replicator/{i}?rev={doc['_rev']}")


def test_config_api_settings_or_a_warning(scene: Scene, couch: CouchDB) -> None:
    done = scene.setup()
    assert done.returncode == 0, done.stderr
    if couch.request("GET", "/_node/_local/_config/couchdb/uuid")[0] != 200:
        assert "no /_node/{node}/_config API" in done.stderr
        return
    _, membership = couch.request("GET", "/_membership")
    for node in membership["cluster_nodes"]:
        base = f"/_node/{node}/_config"
        assert couch.request("GET", f"{base}/chttpd/require_valid_user")[1] == "true"
        assert couch.request("GET", f"{base}/chttpd/require_valid_user_except_for_up")[1] == "true"
        assert couch.request("GET", f"{base}/query_server_config/reduce_limit")[1] == "false"


def test_without_an_admin_password_setup_exits_2(scene: Scene, couch: CouchDB) -> None:
    done = run_agent("setup", "-c", str(scene.config), "--url", scene.bare_url)
    assert done.returncode == 2
    assert "--admin-password-file" in done.stderr
    assert couch.request("GET", f"/{scene.dbs[0]}")[0] == 404


def test_admin_password_from_file_or_environment(scene: Scene, couch: CouchDB, tmp_path: Path) -> None:
    bare_url, (name, password) = scene.bare_url, scene.admin
    password_file = tmp_path / "admin.password"
    password_file.write_text(password + "\n")
    by_file = run_agent("setup", "-c", str(scene.config), "--url", bare_url, "--admin", name,
                        "--admin-password-file", str(password_file), "--db", scene.dbs[0])
    assert by_file.returncode == 0, by_file.stderr
    assert couch.request("GET", f"/{scene.dbs[0]}")[0] == 200
    by_env = run_agent("setup", "-c", str(scene.config), "--url", bare_url, "--admin", name,
                       "--db", scene.dbs[1], env={"COUCHLOG_ADMIN_PASSWORD": password})
    assert by_env.returncode == 0, by_env.stderr
    assert couch.request("GET", f"/{scene.dbs[1]}")[0] == 200
    assert password not in by_file.stdout + by_file.stderr + by_env.stdout + by_env.stderr


DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (.ci/run installs Debian's)")
def test_docker_compose_file_is_valid(tmp_path: Path) -> None:
    folder = tmp_path / "docker"
    shutil.copytree(DOCKER, folder)
    (folder / ".env").write_text((DOCKER / "env.example").read_text())
    done = subprocess.run(["docker-compose", "-f", str(folder / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, check=False, cwd=folder)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert sorted(services) == ["couchdb", "couchdb2", "couchdb3", "nginx", "setup"]
    for node in ("couchdb", "couchdb2", "couchdb3"):
        assert services[node]["image"] == "couchdb:3.5"
        assert "ports" not in services[node]
        assert any(str(v).endswith(":/opt/couchdb/data:rw") or "/opt/couchdb/data" in str(v)
                   for v in services[node]["volumes"])
    assert "profiles" not in services["couchdb"]
    assert services["couchdb2"]["profiles"] == services["couchdb3"]["profiles"] == ["cluster"]
    assert {str(p.get("target") if isinstance(p, dict) else p).split(":")[-1]
            for p in services["nginx"]["ports"]} == {"80", "443"}
    assert services["setup"]["build"]["dockerfile"].endswith("Dockerfile")
    assert services["nginx"]["depends_on"]["setup"]["condition"] == "service_completed_successfully"


def test_install_design_documents_is_idempotent(couchdb_url: str, couch: CouchDB,
                                                database: str) -> None:
    from agent.setup import Client, install_design_documents, split_credentials

    url, admin = split_credentials(couchdb_url)
    client = Client(url, admin)
    page = base64.b64encode(b"<h1>dashboard</h1>").decode()
    docs = [{"_id": "_design/reports", "views": {"by_machine": {
                "map": "function (doc) { emit(doc.machine, 1); }", "reduce": "_count"}}},
            {"_id": "_design/dashboard", "_attachments": {
                "index.html": {"content_type": "text/html", "data": page}}}]
    assert [c.summary for c in install_design_documents(client, database, docs, dry_run=True)] == [
        f"install _design/reports in {database}", f"install _design/dashboard in {database}"]
    assert couch.request("GET", f"/{database}/_design/reports")[0] == 404
    assert len(install_design_documents(client, database, docs)) == 2
    revs = [couch.request("GET", f"/{database}/{d['_id']}")[1]["_rev"] for d in docs]
    assert install_design_documents(client, database, docs) == []
    changed = [{**docs[0], "views": {"by_machine": {"map": "function (doc) { emit(doc.host, 1); }"}}}]
    assert [c.summary for c in install_design_documents(client, database, changed)] == [
        f"update _design/reports in {database}"]
    after = [couch.request("GET", f"/{database}/{d['_id']}")[1]["_rev"] for d in docs]
    assert after[1] == revs[1] and after[0] != revs[0]


def test_a_public_user_that_exists_with_other_roles_keeps_only_the_public_role(
        scene: Scene, couch: CouchDB) -> None:
    # nginx injects this user's login for every anonymous write: with couchlog_agent kept,
    # anyone could take the agent's ids.
    path = f"/_users/org.couchdb.user:{scene.public.name}"
    assert couch.request("PUT", path, {
        "_id": f"org.couchdb.user:{scene.public.name}", "name": scene.public.name, "type": "user",
        "roles": ["couchlog_public", "couchlog_agent", "couchlog_reader"],
        "password": scene.public.password})[0] == 201
    done = scene.setup()
    assert done.returncode == 0, done.stderr
    assert f"update user {scene.public.name}: roles couchlog_public only" in done.stdout
    assert couch.request("GET", path)[1]["roles"] == ["couchlog_public"]
    db = scene.dbs[0]
    agent_id = "s0:1.2.abc:000000000000"
    token = base64.b64encode(f"{scene.public.name}:{scene.public.password}".encode()).decode()
    request = urllib.request.Request(f"{scene.bare_url}/{db}", method="POST",
                                     data=json.dumps({"_id": agent_id, "msg": "pre-empted"}).encode(),
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code in (401, 403)
    assert couch.request("GET", f"/{db}/{agent_id}")[0] == 404
    again = scene.setup()
    assert again.returncode == 0 and again.stdout.startswith("nothing to change"), again.stdout


@pytest.mark.parametrize("db", ["_users", "_replicator", "Log_upper", "log x", "couchlog_dashboard"])
def test_setup_refuses_a_db_that_is_not_a_log_database_name(scene: Scene, couch: CouchDB,
                                                             db: str) -> None:
    before = couch.request("GET", f"/{quote(db, safe='')}/_security")
    done = scene.setup("--dry-run", "--db", db)
    assert done.returncode == 2, done.stdout
    assert "--db" in done.stderr and "would" not in done.stdout
    assert couch.request("GET", f"/{quote(db, safe='')}/_security") == before


def test_the_rendered_front_is_owner_only_even_over_an_older_file(scene: Scene,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "couchlog.conf"
    out.write_text("# an older rendering\n")
    out.chmod(0o644)
    done = run_agent("setup", "--nginx", "--url", scene.bare_url, "--cert", "/etc/c.pem", "--key",
                     "/etc/c.key", "--public-user", scene.public.name, "--public-password-file",
                     str(scene.public.password_file), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert base64.b64encode(f"{scene.public.name}:{scene.public.password}".encode()).decode() \
        in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("secret", ["qzvk/wxyj", "qzvk#wxyj", "qzvk?wxyj"])
@pytest.mark.parametrize("command", [("setup", "--dry-run", "--db", "log_x"),
                                     ("setup", "--nginx", "--cert", "c.pem", "--key", "c.key",
                                      "--public-password-file", "/dev/null"),
                                     ("setup", "--db", "log_x", "--replicate-to"),
                                     ("send", "--db", "log_x", "/dev/null")])
def test_a_url_whose_password_holds_a_slash_or_hash_is_read_without_showing_it(
        secret: str, command: tuple[str, ...]) -> None:
    # urllib reads `http://admin:qzvk/wxyj@host` as host `admin`, port `qzvk`, and its traceback said
    # so; the config's URL rule (the password ends at the last `@`) reads it as written.
    url = f"http://admin:{secret}@127.0.0.1:9"
    args = (*command, url) if command[-1] == "--replicate-to" else (*command, "--url", url)
    if command[-1] == "--replicate-to":
        args = (*args, "--url", "http://127.0.0.1:9")
    done = run_agent(*args, env={"COUCHLOG_ADMIN_PASSWORD": "x"})
    assert "Traceback" not in done.stderr, done.stderr
    if command[0] == "send" or "--dry-run" in command:
        assert "127.0.0.1:9" in done.stderr, done.stderr
    for piece in ("qzvk", "wxyj"):
        assert piece not in done.stdout + done.stderr


def test_dry_run_renders_no_front_file(scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "couchlog.conf"
    out.write_text("# the front in use\n")
    done = run_agent("setup", "--nginx", "--dry-run", "--url", scene.bare_url, "--cert", "/etc/c.pem",
                     "--key", "/etc/c.key", "--public-user", scene.public.name,
                     "--public-password-file", str(scene.public.password_file), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"would write {out} (readable by its owner only)\n"
    assert out.read_text() == "# the front in use\n"


def test_two_setups_at_once_both_succeed(scene: Scene, couch: CouchDB) -> None:
    from agent.setup import (
        ROLE_AGENT,
        Client,
        User,
        Wanted,
        log_security,
        provision,
        split_credentials,
        validation_document,
    )

    class RacedClient(Client):
        """Another `agent setup` makes each change just before this one does (deterministic)."""

        def __init__(self, url: str, auth: tuple[str, str] | None) -> None:
            super().__init__(url, auth)
            self.raced: set[str] = set()

        def request(self, method: str, path: str, body: Any = None,
                    auth: Any = "admin") -> tuple[int, Any]:
            if method == "PUT" and path not in self.raced:
                self.raced.add(path)
                super().request(method, path, body, auth)
            return super().request(method, path, body, auth)

    url, admin = split_credentials(scene.url)
    db = scene.dbs[0]
    wanted = Wanted((db,), (User(scene.agent.name, scene.agent.password, ROLE_AGENT),))
    result = provision(RacedClient(url, admin), wanted)
    # What the other run made first is not counted as this run's.
    assert f"create database {db}" not in [change.summary for change in result.changes]
    assert couch.request("GET", f"/{db}")[0] == 200
    assert couch.request("GET", f"/{db}/_security")[1] == log_security()
    installed = couch.request("GET", f"/{db}/_design/couchlog_validate")[1]
    assert installed["validate_doc_update"] == validation_document()["validate_doc_update"]
    assert couch.request("GET", f"/_users/org.couchdb.user:{scene.agent.name}")[1]["roles"] == [
        ROLE_AGENT]
    assert provision(Client(url, admin), wanted).changes == []


def test_one_user_for_two_roles_is_refused(scene: Scene, couch: CouchDB) -> None:
    # The agent's user as the public writer: nginx would hand the agent's rights to anyone.
    done = run_agent("setup", "-c", str(scene.config), "--url", scene.url,
                     "--public-user", scene.agent.name,
                     "--public-password-file", str(scene.public.password_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "more than one role" in done.stderr
    assert couch.request("GET", f"/_users/org.couchdb.user:{scene.agent.name}")[0] == 404


def test_a_source_writing_to_the_dashboard_database_is_refused(scene: Scene, tmp_path: Path) -> None:
    # couchlog_dashboard would get the log databases' members (writers) and then, on the next
    # run, the dashboard's again: never "nothing to change".
    config = write_config(tmp_path / "etc2", "http://127.0.0.1:9", [
        {"name": "dash", "paths": [str(tmp_path / "d.log")], "database": "couchlog_dashboard",
         "schema": "$msg..."}],
        couchdb={"username": scene.agent.name, "password": scene.agent.password})
    done = run_agent("setup", "-c", str(config), "--url", scene.url, "--dry-run")
    assert done.returncode == 2, done.stdout
    assert "couchlog_dashboard" in done.stderr and "would" not in done.stdout


def test_a_server_admin_as_the_public_writer_is_refused(scene: Scene, couch: CouchDB,
                                                        tmp_path: Path) -> None:
    name, password = scene.admin
    password_file = tmp_path / "admin.password"
    password_file.write_text(password + "\n")
    try:
        done = run_agent("setup", "-c", str(scene.config), "--url", scene.url, "--public-user", name,
                         "--public-password-file", str(password_file))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "is a server admin" in done.stderr and password not in done.stdout + done.stderr
        assert couch.request("GET", f"/_users/org.couchdb.user:{name}")[0] == 404
        assert couch.request("GET", f"/{scene.dbs[0]}")[0] == 404
    finally:
        delete_users(couch, name)  # what a setup that let it through made
