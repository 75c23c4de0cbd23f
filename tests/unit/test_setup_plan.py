"""The pure part of `agent setup`: what it plans for what the server holds, and the nginx render."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from agent import setup
from agent.setup import Front, Replication, Server, User, Wanted

COUCHDB_35_CLUSTER = Server((3, 5), True, ("couchdb@a", "couchdb@b", "couchdb@c"), True, True)
COUCHDB_33 = Server((3, 3), True, ("couchdb@a",), True, True)
POUCHDB = Server(None, False, (), True, False)


def applied(wanted: Wanted, server: Server) -> dict[str, Any]:
    """What the server holds after the plan for an empty server is applied (in a dict)."""
    seen: dict[str, Any] = {}
    for change in setup.plan(wanted, server, {}).changes:
        path = change.path.split("?")[0]
        body = change.body
        if isinstance(body, dict) and "_id" in body:
            body = {**body, "_rev": "1-a"}
            if "_attachments" in body:
                body["_attachments"] = {
                    name: {"stub": True, "digest": "md5-" + base64.b64encode(hashlib.md5(
                        base64.b64decode(a["data"])).digest()).decode()}
                    for name, a in body["_attachments"].items()}
        seen[path] = {} if body is None else body
    for user in wanted.users:
        seen[f"password_ok:{user.name}"] = True
    return seen


def wanted(**kwargs: Any) -> Wanted:
    page = {"_id": "_design/dashboard", "_attachments": {
        "index.html": {"content_type": "text/html", "data": base64.b64encode(b"<p>").decode()}}}
    defaults: dict[str, Any] = dict(
        databases=("log_a", "log_b"), users=(User("host1", "pw1", setup.ROLE_AGENT),),
        replication=Replication("https://backup:6984", ("u", "target-pw"), "http://couch:5984",
                                ("admin", "admin-pw")),
        design_documents=({"_id": "_design/reports", "views": {"v": {"map": "function(d){}"}}},),
        dashboard_documents=(page,))
    return Wanted(**{**defaults, **kwargs})


@pytest.mark.parametrize("server", [COUCHDB_35_CLUSTER, COUCHDB_33, POUCHDB])
def test_a_second_plan_is_empty(server: Server) -> None:
    want = wanted()
    first = setup.plan(want, server, {})
    assert first.changes
    assert setup.plan(want, server, applied(want, server)).changes == []


def test_config_is_set_on_every_node_and_quickjs_from_3_4() -> None:
    paths = {c.path: c.body for c in setup.plan(wanted(), COUCHDB_35_CLUSTER, {}).changes}
    for node in COUCHDB_35_CLUSTER.nodes:
        base = f"/_node/{node.replace('@', '%40')}/_config"
        assert paths[f"{base}/chttpd/require_valid_user"] == "true"
        assert paths[f"{base}/chttpd/require_valid_user_except_for_up"] == "true"
        assert paths[f"{base}/query_server_config/reduce_limit"] == "false"
        assert paths[f"{base}/couchdb/js_engine"] == "quickjs"
    spidermonkey = {c.path: c.body for c in setup.plan(wanted(js_engine="spidermonkey"),
                                                       COUCHDB_35_CLUSTER, {}).changes}
    assert spidermonkey["/_node/couchdb%40a/_config/couchdb/js_engine"] == "spidermonkey"
    older = [c.path for c in setup.plan(wanted(), COUCHDB_33, {}).changes]
    assert not any(p.endswith("/js_engine") for p in older)


def test_without_config_api_or_replicator_it_says_so_and_goes_on() -> None:
    result = setup.plan(wanted(), Server(None, False, (), False, False), {})
    assert any("_config API" in note for note in result.notes)
    assert any("_replicator" in note for note in result.notes)
    assert any(c.summary == "create database log_a" for c in result.changes)
    assert not any(c.path.startswith(("/_node", "/_replicator")) for c in result.changes)


def test_shards_and_replicas_go_with_database_creation() -> None:
    changes = setup.plan(wanted(shards=8, replicas=3), COUCHDB_35_CLUSTER, {}).changes
    assert "/log_a?q=8&n=3" in [c.path for c in changes]


def test_a_wrong_password_or_missing_role_updates_the_user() -> None:
    user = User("host1", "pw1", setup.ROLE_AGENT)
    current = {"_id": "org.couchdb.user:host1", "_rev": "3-x", "name": "host1", "type": "user",
               "roles": ["other"], "derived_key": "k", "salt": "s"}
    change = setup.plan_user(user, current, password_ok=True)
    assert change is not None and change.body["roles"] == ["other", setup.ROLE_AGENT]
    assert change.body["_rev"] == "3-x"
    fixed = {**current, "roles": ["other", setup.ROLE_AGENT]}
    assert setup.plan_user(user, fixed, password_ok=True) is None
    again = setup.plan_user(user, fixed, password_ok=False)
    assert again is not None and again.body["password"] == "pw1"


def test_no_summary_carries_a_secret() -> None:
    text = "\n".join(c.summary for c in setup.plan(wanted(), COUCHDB_35_CLUSTER, {}).changes)
    for secret in ("pw1", "target-pw", "admin-pw"):
        assert secret not in text


def test_replication_documents_are_named_after_the_database() -> None:
    changes = [c for c in setup.plan(wanted(), COUCHDB_35_CLUSTER, {}).changes
               if c.path.startswith("/_replicator/")]
    assert [c.path for c in changes] == ["/_replicator/couchlog-log_a", "/_replicator/couchlog-log_b"]
    assert changes[0].body["target"] == {"url": "https://backup:6984/log_a", "auth": {
        "basic": {"username": "u", "password": "target-pw"}}}
    assert changes[0].body["continuous"] is True


def front(**kwargs: Any) -> Front:
    base: dict[str, Any] = dict(server_name="logs.example.org", cert="/c.pem", key="/k.pem",
                                upstreams=("couchdb:5984",), public_user="pub", public_password="s3")
    return Front(**{**base, **kwargs})


def test_nginx_render_fills_every_placeholder() -> None:
    text = setup.render_nginx(setup.NGINX_TEMPLATE.read_text(), front(
        upstreams=("couch1:5984", "couch2:5984", "couch3:5984")))
    assert "{{" not in text
    assert "Basic " + base64.b64encode(b"pub:s3").decode() in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    for node in ("couch1", "couch2", "couch3"):
        assert f"    server {node}:5984;" in text
    assert "return 301 https://$host$request_uri;" in text
    assert "if (" not in text and "if(" not in text


@pytest.mark.parametrize("bad", [dict(server_name="a; include /etc/passwd"), dict(cert="/x y"),
                                 dict(max_body_size="1m;"), dict(upstreams=())])
def test_nginx_render_refuses_values_nginx_would_misread(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        setup.render_nginx(setup.NGINX_TEMPLATE.read_text(), front(**bad))
