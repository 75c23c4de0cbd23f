"""Configuration: every kind of error names the file and key path, and `agent` exits with code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.cli import main
from tests.unit.configfiles import problems, write_config_files

GOOD_SOURCE = {"name": "fail2ban", "paths": ["/var/log/fail2ban.log"], "schema": "$date $rest..."}


def write(folder: Path, main_file: Any = None, sources: dict[str, Any] | None = None) -> Path:
    return write_config_files(folder, main_file, {"f.yaml": GOOD_SOURCE} if sources is None else sources)


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path))
    assert cfg.couchdb.urls == ("http://127.0.0.1:5984",)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.sources_dir == tmp_path / "conf.d"
    (source,) = cfg.sources
    assert source.database == "log_fail2ban"
    assert source.on_parse_error == "ship" and source.metadata_key == "agent"


def test_sizes_durations_and_url_lists(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, {
        "couchdb": {"url": ["http://a:5984/", "https://b"], "request_timeout": "1500ms"},
        "shipping": {"batch_max_bytes": "2MiB", "linger": "1s", "queue_max_bytes": 1000}}))
    assert cfg.couchdb.urls == ("http://a:5984", "https://b")
    assert cfg.couchdb.request_timeout == 1.5
    assert cfg.shipping.batch_max_bytes == 2 * 1024 * 1024 and cfg.shipping.linger == 1.0


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = config.load(write(tmp_path, {"couchdb": {"url": "http://h", "username": "w",
                                                   "password_file": "pw"}}))
    assert cfg.couchdb.password == "s3cret"


@pytest.mark.parametrize(("main_file", "sources", "expected"), [
    ("a: [1", None, "agent.yaml: invalid YAML: line 1"),
    ("- 1\n", None, "agent.yaml: expected a mapping of keys at the top, got a list"),
    ({"state_dir": "s"}, None, "agent.yaml: couchdb.url: missing"),
    ({"couchdb": {"url": "ftp://x"}}, None, "couchdb.url: expected an http:// or https:// URL"),
    ({"couchdb": {"url": "http://x", "usrname": "a"}}, None,
     "couchdb.usrname: unknown key; did you mean 'couchdb.username'?"),
    ({"couchdb": {"url": "http://x", "username": "a"}}, None,
     "couchdb.password: couchdb.username and a password go together"),
    ({"couchdb": {"url": "http://x", "username": "a", "password": "b", "password_file": "f"}}, None,
     "couchdb.password: the password is given by couchdb.password and couchdb.password_file; "
     "give it once"),
    ({"couchdb": {"url": "http://x", "username": "a", "password_file": "nope"}}, None,
     "couchdb.password_file: cannot read the password"),
    ({"couchdb": {"url": "http://x", "request_timeout": "soon"}}, None,
     "couchdb.request_timeout: expected a duration"),
    ({"couchdb": {"url": "http://x"}, "shipping": {"batch_max_docs": 0}}, None,
     "shipping.batch_max_docs: expected a positive whole number"),
    ({"couchdb": {"url": "http://x"}, "shipping": {"batch_max_bytes": "lots"}}, None,
     "shipping.batch_max_bytes: expected a size"),
    ({"couchdb": {"url": "http://x"}, "log": {"level": "loud"}}, None,
     "log.level: expected one of debug, info, warning, error"),
    ({"couchdb": {"url": "http://x"}, "sources_dir": "elsewhere"}, None,
     "elsewhere: sources_dir: folder not found"),
    (None, {}, "conf.d: sources_dir: no *.yaml source files"),
    (None, {"s.yaml": {"paths": ["/x"], "schema": "$a"}}, "s.yaml: name: missing"),
    (None, {"s.yaml": {**GOOD_SOURCE, "name": "Bad Name"}}, "s.yaml: name: expected lowercase"),
    (None, {"s.yaml": {**GOOD_SOURCE, "database": "_users"}},
     "s.yaml: database: '_users' is not a valid"),
    (None, {"s.yaml": {"name": "a", "schema": "$a"}}, "s.yaml: paths: missing"),
    (None, {"s.yaml": {"name": "a", "paths": "/x"}}, "s.yaml: schema: set exactly one of schema, regex or "
     "format: json (given: none)"),
    (None, {"s.yaml": {**GOOD_SOURCE, "regex": "(?P<a>x)"}}, "(given: schema, regex)"),
    (None, {"s.yaml": {**GOOD_SOURCE, "schema": "$a $a"}}, "s.yaml: schema: '$a' is captured twice"),
    (None, {"s.yaml": {"name": "a", "paths": "/x", "regex": "(?P<a>"}},
     "s.yaml: regex: invalid regular"),
    (None, {"s.yaml": {"name": "a", "paths": "/x", "regex": "x+"}}, "s.yaml: regex: invalid regular "
     "expression: it has no named group"),
    (None, {"s.yaml": {"name": "a", "paths": "/x", "format": "xml"}},
     "s.yaml: format: expected one of json"),
    (None, {"s.yaml": {**GOOD_SOURCE, "include": ["ok", "(bad"]}},
     "s.yaml: include: item 1: invalid regular"),
    (None, {"s.yaml": {**GOOD_SOURCE, "exclude": {"a": 1}}}, "s.yaml: exclude: expected a list of strings"),
    (None, {"s.yaml": {**GOOD_SOURCE, "fields": {"_rev": "1"}}}, "s.yaml: fields._rev: field names starting"),
    (None, {"s.yaml": {**GOOD_SOURCE, "fields": {"agent": "x"}}},
     "s.yaml: fields.agent: 'agent' holds the agent's metadata (metadata_key)"),
    (None, {"s.yaml": {**GOOD_SOURCE, "fields": ["a"]}}, "s.yaml: fields: expected a mapping"),
    (None, {"s.yaml": {**GOOD_SOURCE, "fields": {"a": {"b": 1}}}},
     "fields: field 'a': expected a plain value"),
    (None, {"s.yaml": {**GOOD_SOURCE, "on_parse_error": "explode"}},
     "s.yaml: on_parse_error: expected one of"),
    (None, {"s.yaml": {**GOOD_SOURCE, "pahts": ["/x"]}}, "s.yaml: pahts: unknown key; did you mean 'paths'?"),
    (None, {"a.yaml": GOOD_SOURCE, "b.yaml": GOOD_SOURCE}, "b.yaml: name: source 'fail2ban' is also defined"),
    (None, {"s.yaml": "name: [x"}, "s.yaml: invalid YAML"),
])
def test_every_kind_of_error_names_file_and_key(tmp_path: Path, main_file: Any,
                                                sources: dict[str, Any] | None, expected: str) -> None:
    found = problems(write(tmp_path, main_file, sources))
    assert any(expected in p for p in found), found


def test_missing_main_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: file not found; "
                                                "pass the right one with -c PATH"]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    found = problems(write(tmp_path, {"couchdb": {"url": "x"}, "bogus": 1},
                           {"s.yaml": {"name": "a", "paths": "/x"}}))
    assert len(found) == 3, found


def test_cli_exits_2_with_the_key_path_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, sources={"s.yaml": {**GOOD_SOURCE, "schema": "$a$b"}})
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    where = tmp_path / "conf.d" / "s.yaml"
    assert f"agent: config error: {where}: schema: captures '$a' and '$b' touch" in err


def test_check_prints_one_line_per_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "x.log"
    log.touch()
    path = write(tmp_path, sources={"a.yaml": {**GOOD_SOURCE, "name": "a", "paths": [str(log)]},
                                    "b.yaml": {**GOOD_SOURCE, "name": "b", "database": "logs_b"}})
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a: schema (2 fields), include 0, exclude 0, 0 static fields -> log_a; "
                             "1 glob(s), 1 file(s) now")
    assert out[1].startswith("b: ") and "-> logs_b" in out[1]
    assert out[2].startswith("ok: 2 source(s)")


def test_check_keys_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in config.MAIN_KEYS + config.SOURCE_KEYS:
        assert key.path in out


def test_shipped_examples_are_valid(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "config"
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "password").write_text("pw\n")
    main_text = (examples / "agent.yaml").read_text().replace("/etc/couchlog/password", "password")
    (tmp_path / "agent.yaml").write_text(main_text)
    for source in (examples / "conf.d").iterdir():
        (tmp_path / "conf.d" / source.name.removesuffix(".example")).write_text(source.read_text())
    cfg = config.load(tmp_path / "agent.yaml")
    assert sorted(s.name for s in cfg.sources) == ["auth", "fail2ban"]
    assert cfg.couchdb.password == "pw"


def test_readme_has_the_current_key_reference() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.describe_keys(markdown=True) in readme, "run scripts/update-readme"
