"""Issue 9 config rules: each key declared once, secrets never printed, where the password comes
from, YAML values that mean what they look like, reserved names, and state_dir kept out of paths."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import pytest
import yaml

from agent import config
from agent.cli import main
from agent.couchdb import endpoints
from tests.unit.configfiles import problems, write_config_files

GOOD_SOURCE = {"name": "app", "paths": ["/var/log/app.log"], "schema": "$msg..."}
# Every character that means something in a URL, and the ones people paste by mistake.
PASSWORD = "p#w/d?q@r:s%t u&v=w+x;y,z[1]!$'()*~"
RAW_PASSWORD = "p#w/d?q@r:s%zz u&v=w+x;y,z!$'()*~"  # `%zz` is no escape, so it stays as written


def write(folder: Path, main_file: Any = None, sources: dict[str, Any] | None = None,
          mode: int = 0o600) -> Path:
    return write_config_files(folder, main_file, {"s.yaml": GOOD_SOURCE} if sources is None else sources,
                              mode)


def secret_forms(password: str) -> list[str]:
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    return [password, quote(password, safe=""), token]


# -- item 9: each key once


def test_records_defaults_are_the_keys_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path))
    assert cfg.shipping == config.ShippingConfig()
    assert cfg.spool == config.SpoolConfig()
    for key in config.MAIN_KEYS:
        section = key.path.split(".")[0]
        record: Any = getattr(cfg, section) if section in ("couchdb", "shipping", "spool") else cfg
        if not key.required and key.shown is None and not isinstance(key.default, Path):
            assert getattr(record, key.attribute) == key.default, key.path


def test_choices_come_from_the_literal_types() -> None:
    by_path = {k.path: k for k in config.MAIN_KEYS + config.SOURCE_KEYS}
    assert by_path["spool.when_full"].read.choices == get_args(config.WhenFull)  # type: ignore[attr-defined]
    assert by_path["watch"].read.choices == get_args(config.WatchMode)  # type: ignore[attr-defined]
    assert "(one of: auto, inotify, poll)" in config.describe_keys()


def test_every_key_of_a_record_is_in_the_table() -> None:
    paths = {k.path for k in config.MAIN_KEYS}
    for item in fields(config.ShippingConfig):
        assert f"shipping.{item.name}" in paths
    assert {"couchdb.ca_file", "couchdb.tls_verify", "couchdb.password_file"} <= paths
    assert "follow_symlinks" in {k.path for k in config.SOURCE_KEYS}


def test_new_keys(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = config.load(write(tmp_path, {"couchdb": {"url": "https://db.example", "ca_file": "ca.pem",
                                                   "tls_verify": False}, "state_dir": "state"},
                            {"s.yaml": {**GOOD_SOURCE, "follow_symlinks": True}}))
    assert cfg.couchdb.ca_file == tmp_path / "ca.pem" and cfg.couchdb.tls_verify is False
    assert cfg.sources[0].follow_symlinks is True
    default = config.load(write(tmp_path))
    assert default.couchdb.ca_file is None and default.couchdb.tls_verify is True
    assert default.sources[0].follow_symlinks is False
    assert any("tls_verify: expected true or false" in p for p in problems(write(
        tmp_path, {"couchdb": {"url": "http://h", "tls_verify": "no way"}})))


# -- item 2: credentials in URLs parse robustly, and are never printed


@pytest.mark.parametrize(("userinfo", "password"), [
    (f"admin:{RAW_PASSWORD}", RAW_PASSWORD),
    (f"admin:{quote(PASSWORD, safe='')}", PASSWORD),
])
def test_credentials_are_taken_off_the_url(tmp_path: Path, userinfo: str, password: str) -> None:
    cfg = config.load(write(tmp_path, {"couchdb": {"url": [f"http://{userinfo}@127.0.0.1:5984/",
                                                           "https://db.example/couch"]}}))
    assert cfg.couchdb.urls == ("http://127.0.0.1:5984", "https://db.example/couch")
    assert cfg.couchdb.username == "admin" and cfg.couchdb.password == password
    assert cfg.couchdb.password_from == "couchdb.url"
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    assert [e.headers for e in endpoints(cfg.couchdb)] == [{"Authorization": f"Basic {token}"}] * 2
    assert [e.url for e in endpoints(cfg.couchdb)] == list(cfg.couchdb.urls)
    assert password not in repr(cfg)


@pytest.mark.parametrize("url", [
    f"ftp://admin:{RAW_PASSWORD}@h",
    f"admin:{RAW_PASSWORD}@h:5984",
    f"http://admin:{RAW_PASSWORD}@h:99999",
    f"http://admin:{RAW_PASSWORD}@:5984",
    f"http://admin:{RAW_PASSWORD}@h/db?x=1",
    f"http://:{RAW_PASSWORD}@h",
    f"http://admin:{quote(PASSWORD, safe='')}@bad host",
])
def test_a_bad_url_is_refused_without_its_password(tmp_path: Path, url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"couchdb": {"url": url}})
    found = problems(path)
    assert any("couchdb.url: " in p for p in found), found
    assert main(["check", "-c", str(path)]) == 2
    printed = "\n".join(found) + capsys.readouterr().err
    for secret in [*secret_forms(RAW_PASSWORD), *secret_forms(PASSWORD), "s%zz", "p#w"]:
        assert secret not in printed


def test_port_and_host_are_validated(tmp_path: Path) -> None:
    # A port that is no port is not shown: it may be a password typed with ':' for '@'.
    for url, expected in [("http://h:99999", "'http://h:***': the port must be a number from 1 "
                           "to 65535"), ("http://h:0", "'http://h:***': the port must be"),
                          ("http://h:x", "'http://h:***': the port must be"),
                          ("http://", "'http://' has no host name"),
                          ("http://[zz::1]", "'http://[zz::1]': 'zz::1' does not appear"),
                          ("http://a b", "'http://a b': 'a b' is not a host name")]:
        found = problems(write(tmp_path, {"couchdb": {"url": url}}))
        assert any(f"couchdb.url: {expected}" in p for p in found), found
    assert config.load(write(tmp_path, {"couchdb": {"url": "http://[::1]:5984"}})).couchdb.urls \
        == ("http://[::1]:5984",)


def test_check_prints_no_password(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.PASSWORD_ENV, raising=False)
    path = write(tmp_path, {"couchdb": {"url": f"http://admin:{RAW_PASSWORD}@127.0.0.1:5984"},
                            "state_dir": "state"})
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "CouchDB http://127.0.0.1:5984 as admin (password from couchdb.url)" in out
    for secret in secret_forms(RAW_PASSWORD):
        assert secret not in out + err


def test_credentials_given_twice_differently_are_refused(tmp_path: Path) -> None:
    found = problems(write(tmp_path, {"couchdb": {"url": ["http://a:x@h1", "http://b:y@h2"]}}))
    assert any("the URLs carry different credentials" in p for p in found), found
    found = problems(write(tmp_path, {"couchdb": {"url": "http://a:x@h1", "username": "b"}}))
    assert any("couchdb.username: differs from the user in couchdb.url" in p for p in found), found
    found = problems(write(tmp_path, {"couchdb": {"url": "http://a:secret1@h1", "password": "secret2"}}))
    assert any("the password is given by couchdb.password and couchdb.url" in p for p in found), found
    assert not any("secret" in p for p in found), found


# -- item 3: where the password comes from


def test_password_sources_and_which_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.PASSWORD_ENV, "from-env")
    cfg = config.load(write(tmp_path, {"couchdb": {"url": "http://h", "username": "w"}}))
    assert cfg.couchdb.password == "from-env" and cfg.couchdb.password_from == config.PASSWORD_ENV
    assert cfg.warnings == ()
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = config.load(write(tmp_path, {"couchdb": {"url": "http://h", "username": "w",
                                                   "password_file": "pw"}}))
    assert cfg.couchdb.password == "from-file"
    assert [w.key for w in cfg.warnings] == ["couchdb.password_file"]
    assert "COUCHLOG_PASSWORD is set too and is ignored" in cfg.warnings[0].message
    cfg = config.load(write(tmp_path, {"couchdb": {"url": "http://h"}}))
    assert cfg.couchdb.password is None
    assert "no user is; it is ignored" in cfg.warnings[0].message


def test_warns_when_others_can_read_a_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(config.PASSWORD_ENV, raising=False)
    inline = {"couchdb": {"url": "http://h", "username": "w", "password": "s3cret"},
              "state_dir": "state"}
    assert config.load(write(tmp_path, inline, mode=0o640)).warnings == ()
    path = write(tmp_path, inline, mode=0o644)
    (warning,) = config.load(path).warnings
    assert warning.key == "couchdb.password" and "every user can read it" in warning.message
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"agent: config warning: {path}: couchdb.password: this file holds a password" in err
    assert "s3cret" not in err
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "pw").chmod(0o644)
    (warning,) = config.load(write(tmp_path, {"couchdb": {"url": "http://h", "username": "w",
                                                          "password_file": "pw"}}, mode=0o644)).warnings
    assert warning.file == tmp_path / "pw" and "chmod 0600" in warning.message


def test_status_needs_no_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").mkdir()  # unreadable as a file, whoever runs the test (root reads 0600 files)
    path = write(tmp_path, {"couchdb": {"url": "http://h", "username": "w", "password_file": "pw"},
                            "state_dir": "state"})
    assert any("couchdb.password_file: cannot read the password" in p for p in problems(path))
    cfg = config.load(path, need_secret=False)
    assert cfg.couchdb.password is None and cfg.couchdb.username == "w"
    assert main(["status", "-c", str(path)]) == 3, capsys.readouterr()
    assert "config error" not in capsys.readouterr().err
    log = tmp_path / "app.log"
    log.write_text("hello world\n")
    parsed = subprocess.run([sys.executable, "-m", "agent", "parse", "-c", str(path), "--source", "app",
                             str(log)], capture_output=True, text=True, timeout=60)
    assert parsed.returncode == 0 and '"msg":"hello world"' in parsed.stdout, parsed


# -- item 5: YAML values mean what they look like


@pytest.mark.parametrize(("written", "meant"), [
    ("0123", "0123"), ("12:30", "12:30"), ("0x1F", "0x1F"), ("1.10", "1.10"), ("yes", "yes"),
    ("2024-01-01", "2024-01-01"), ("1e3", "1e3")])
def test_a_string_key_given_a_yaml_number_says_quote_it(tmp_path: Path, written: str,
                                                        meant: str) -> None:
    def main_text(value: str) -> str:
        return (f"couchdb:\n  url: http://h\n  username: {value}\n  password: {value}\n"
                f"host: {value}\nstate_dir: state\n")

    def source_text(value: str) -> str:
        return f"name: app\npaths: [/x]\nschema: $m...\nmetadata_key: m{value}\nfields:\n  v: {value}\n"

    path = write(tmp_path, main_text(written), {"s.yaml": source_text(written)})
    if meant == "1e3":  # YAML 1.1 has no exponent without a dot: this one stays text
        assert config.load(path).couchdb.password == "1e3"
        return
    found = {p.split(": ", 2)[1]: p.split(": ", 2)[2] for p in problems(path)}
    for key in ("couchdb.username", "couchdb.password", "host", "fields"):
        assert "put the value in quotes" in found[key], found
    # The message does not depend on the value, so it cannot echo a password.
    assert found["couchdb.password"] == found["couchdb.username"]
    assert str(yaml.safe_load(written)) not in found["couchdb.password"].replace(written, "")
    quoted = f"'{written}'"
    cfg = config.load(write(tmp_path, main_text(quoted), {"s.yaml": source_text(quoted)}))
    assert cfg.couchdb.username == cfg.couchdb.password == cfg.host == meant
    assert cfg.sources[0].fields == {"v": meant}


@pytest.mark.parametrize(("source", "expected"), [
    ({**GOOD_SOURCE, "metadata_key": "_meta"}, "s.yaml: metadata_key: names starting with '_' are reserved"),
    ({**GOOD_SOURCE, "fields": {"_id": "x"}}, "s.yaml: fields._id: field names starting with '_'"),
    ({**GOOD_SOURCE, "fields": {"meta": "x"}, "metadata_key": "meta"}, "fields.meta: 'meta' holds"),
    ({**GOOD_SOURCE, "fields": {1: "x"}}, "s.yaml: fields: field name 1: YAML read it as a number"),
    ({**GOOD_SOURCE, "multiline": {"timeout": 1}}, "s.yaml: multiline.start: missing"),
])
def test_reserved_and_malformed_names(tmp_path: Path, source: dict[str, Any], expected: str) -> None:
    found = problems(write(tmp_path, sources={"s.yaml": source}))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("text", ["a: &x [*x]\n", "a: &x {b: *x}\n", "couchdb: &x {url: *x}\n"])
def test_a_recursive_alias_is_a_config_error(tmp_path: Path, text: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, text)
    assert main(["check", "-c", str(path)]) == 2
    assert f"agent: config error: {path}: invalid YAML: an alias" in capsys.readouterr().err
    source = write(tmp_path, sources={"s.yaml": text})
    assert any(str(tmp_path / "conf.d" / "s.yaml") in p for p in problems(source))


def test_aliases_that_multiply_or_nest_too_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{n}: &a{n} [*a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, "
        f"*a{n - 1}, *a{n - 1}, *a{n - 1}]\n" for n in range(1, 12))
    path = write(tmp_path, laughs)
    assert main(["check", "-c", str(path)]) == 2
    assert f"{path}: invalid YAML: its aliases expand it to over" in capsys.readouterr().err
    write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["check", "-c", str(path)]) == 2
    assert f"{path}: invalid YAML: " in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    ("just text\n", "expected a mapping of keys at the top, got str"),
    ("- a\n", "got a list"), ("42\n", "got a number"), (b"\xff\xfe", "cannot read")])
def test_whatever_the_file_holds_exit_2_naming_it(tmp_path: Path, text: str | bytes, expected: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"agent: config error: {path}: " in err and expected in err, err


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """`agent ARGS` as an unprivileged user: root reads every file, whatever its mode."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the agent as another user")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_folder_or_unreadable_file_as_config(tmp_path: Path, shared_folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path)]) == 2
    assert f"agent: config error: {tmp_path}: is a folder, not a YAML file" in capsys.readouterr().err
    path = write(shared_folder)
    result = as_nobody("check", "-c", str(path))
    assert result.returncode == 2
    assert f"agent: config error: {path}: cannot read: permission denied" in result.stderr


def test_status_as_a_user_who_cannot_read_the_password(shared_folder: Path) -> None:
    (shared_folder / "password").write_text("s3cret\n")
    (shared_folder / "password").chmod(0o600)
    path = write(shared_folder, {"couchdb": {"url": "http://h", "username": "w",
                                             "password_file": "password"}, "state_dir": "state"},
                 mode=0o644)
    (shared_folder / "conf.d" / "s.yaml").chmod(0o644)
    (shared_folder / "conf.d").chmod(0o755)
    result = as_nobody("status", "-c", str(path))
    assert result.returncode == 3 and "config error" not in result.stderr, result
    checked = as_nobody("check", "-c", str(path))
    assert checked.returncode == 2 and "couchdb.password_file: cannot read the password" in checked.stderr
    assert "s3cret" not in checked.stderr + result.stdout + result.stderr


# -- item 4: a source must not reach into state_dir


@pytest.mark.parametrize(("paths", "state_dir", "reaches"), [
    (["{root}/state/**"], "state", True),
    (["{root}/**/*.json"], "state", True),
    (["{root}/*/offsets.json"], "state", True),
    (["{root}/st*/*"], "state", True),
    (["{root}/st*"], "state", False),  # matches the folder itself, which is never followed
    (["../**"], "state", True),
    (["/var/log/*.log"], "state", False),
    (["{root}/link/*.json"], "state", True),  # a symlink to state_dir
    (["{root}/logs/*.log", "{root}/state.log"], "state", False),
    (["{root}/logs/**"], "/var/lib/couchlog", False),
    (["/var/lib/**"], "/var/lib/couchlog", True),
])
def test_check_refuses_globs_that_reach_state_dir(tmp_path: Path, paths: list[str], state_dir: str,
                                                  reaches: bool, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "state")
    source = {**GOOD_SOURCE, "paths": [p.format(root=tmp_path) for p in paths]}
    path = write(tmp_path, {"couchdb": {"url": "http://h"}, "state_dir": state_dir}, {"s.yaml": source})
    code = main(["check", "-c", str(path)])
    err = capsys.readouterr().err
    assert code == (2 if reaches else 0), err
    if reaches:
        assert f"{tmp_path / 'conf.d' / 's.yaml'}: paths: " in err and "can match files in state_dir" in err
