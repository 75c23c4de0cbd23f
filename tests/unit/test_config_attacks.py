"""Attacks on what the agent reads before it runs (the configuration, the password file, the
status snapshot), as a careless operator or someone with write access to one of them would
make them: special files, huge files, YAML that hides a secret in an error, values that YAML
changes silently. None may hang, eat memory, traceback or print a secret."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import config, durable
from agent.deadletter import DeadLetterFile, Rejection
from agent.globs import expand
from agent.offsets import StateFile
from agent.status import StatusFile
from agent.types import Document, FileId, SourceFile
from agent.watcher import scan
from tests.unit.test_config_rules import write

FILE = SourceFile("app", FileId(1, 2, "ab"))
HANG_GUARD = 60
"""Seconds before a command counts as hung: not a speed limit, each case answers at once."""


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    """`agent ARGS` in its own process, so that a command that blocks on a FIFO fails the test
    instead of hanging the suite."""
    try:
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                              text=True, timeout=HANG_GUARD, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`agent {' '.join(args)}` hung")


def special(path: Path, kind: str) -> None:
    """Make `path` a FIFO, or a link to an endless device."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


# -- special files: a FIFO or /dev/zero where a file is read never hangs nor fills memory


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("command", ["check", "status"])
def test_a_main_file_that_is_a_fifo_or_endless_is_a_config_error(tmp_path: Path, kind: str,
                                                                  command: str) -> None:
    path = write(tmp_path)
    special(path, kind)
    result = agent(command, "-c", str(path))
    # `agent status` is a monitoring plugin: a config it cannot read is UNKNOWN (3), on stdout.
    code, output = (3, result.stdout) if command == "status" else (2, result.stderr)
    assert result.returncode == code, result.stderr
    assert f"{path}: cannot read: not a regular file" in output


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_source_file_that_is_a_fifo_or_endless_is_a_config_error(tmp_path: Path,
                                                                   kind: str) -> None:
    path = write(tmp_path)
    special(tmp_path / "conf.d" / "other.yaml", kind)
    result = agent("check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert (f"agent: config error: {tmp_path / 'conf.d' / 'other.yaml'}: cannot read: not a "
            "regular file") in result.stderr


def test_a_huge_config_file_is_refused_without_being_read(tmp_path: Path) -> None:
    path = write(tmp_path)
    with path.open("r+b") as f:
        f.truncate(64 * 1024**3)  # sparse: no disk used, but read whole it would take 64 GiB
    result = agent("check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert f"agent: config error: {path}: cannot read: larger than" in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_password_file_that_is_a_fifo_or_endless_is_a_config_error(tmp_path: Path,
                                                                     kind: str) -> None:
    path = write(tmp_path, {"couchdb": {"url": "http://admin@127.0.0.1:5984",
                                        "password_file": "password"}, "state_dir": "state"})
    special(tmp_path / "password", kind)
    result = agent("check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert "couchdb.password_file: cannot read the password from" in result.stderr
    assert "not a regular file" in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_status_file_that_is_a_fifo_or_endless_is_unknown(tmp_path: Path, kind: str,
                                                            as_json: bool) -> None:
    path = write(tmp_path)
    (tmp_path / "state").mkdir()
    special(tmp_path / "state" / "status.json", kind)
    result = agent("status", "-c", str(path), *(["--json"] if as_json else []))
    assert result.returncode == 3, result.stderr
    assert "cannot be read (not a regular file" in result.stdout


@pytest.mark.parametrize("name", ["offsets.json", "offsets.json.tmp"])
def test_a_state_file_that_is_a_fifo_does_not_hang_the_start(tmp_path: Path, name: str) -> None:
    """A FIFO in place of the offsets (or of their temp file) is an unreadable state, not a
    start that waits forever before it can even take SIGTERM."""
    os.mkfifo(tmp_path / name)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(StateFile(tmp_path).load()), daemon=True)
    reader.start()
    reader.join(HANG_GUARD)
    assert found, "StateFile.load hung on a FIFO"
    entries, status = found[0]  # type: ignore[misc]
    assert entries == {} and status == ("corrupt" if name == "offsets.json" else "absent")


# -- secrets never printed: PyYAML quotes tags and aliases, which are the value when unquoted


@pytest.mark.parametrize("password", ["!Pa55word", "*Pa55word", "!!Pa55word", "!<Pa55word>",
                                      "!Pa55word rest"])
@pytest.mark.parametrize("command", ["check", "status"])
def test_a_yaml_error_never_shows_the_password(tmp_path: Path, password: str, command: str) -> None:
    path = write(tmp_path, "couchdb:\n  url: http://admin@127.0.0.1:5984\n"
                 f"  password: {password}\nstate_dir: state\n")
    result = agent(command, "-c", str(path))
    # `agent status` is a monitoring plugin: a config it cannot read is UNKNOWN (3), on stdout.
    code, output = (3, result.stdout) if command == "status" else (2, result.stderr)
    assert result.returncode == code, result.stderr
    assert f"{path}: invalid YAML: line 3, column 13: " in output
    assert "quote a value that starts with !" in output
    assert "Pa55word" not in result.stdout + result.stderr


# -- the password file holds the password as written


@pytest.mark.parametrize(("content", "password"), [
    ("\ufeffs3cret\r\n", "s3cret"),  # a Windows editor's BOM and line end
    ("s3cret\r\nsecond line\n", "s3cret"),
    ("s3c\fret\n", "s3c\fret"), ("s3c\x85ret", "s3c\x85ret"), ("s3c\u2028ret\n", "s3c\u2028ret"),
    ("s3c\x1cret\n", "s3c\x1cret"), (" s3cret \n", " s3cret "),
])
def test_the_password_file_gives_its_first_line_whole(tmp_path: Path, content: str,
                                                      password: str) -> None:
    path = write(tmp_path, {"couchdb": {"url": "http://admin@127.0.0.1:5984",
                                        "password_file": "password"}, "state_dir": "state"})
    (tmp_path / "password").write_bytes(content.encode())
    assert config.load(path).couchdb.password == password


# -- YAML that changes values silently


@pytest.mark.parametrize("text", [
    "couchdb:\n  url: http://a:5984\n  url: http://b:5984\nstate_dir: state\n",
    "couchdb:\n  url: http://a:5984\nstate_dir: state\nstate_dir: other\n",
    "couchdb: {url: 'http://a:5984', url: 'http://b:5984'}\nstate_dir: state\n",
])
def test_a_key_given_twice_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    result = agent("check", "-c", str(path))
    assert result.returncode == 2, result.stdout
    assert f"agent: config error: {path}: invalid YAML: line " in result.stderr
    assert "twice" in result.stderr


def test_a_key_given_twice_in_a_source_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, sources={"s.yaml": "name: app\npaths: [/var/log/a.log]\n"
                                    "format: json\nfields: {env: prod, env: test}\n"})
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert "found the key env twice" in str(info.value)


def test_merged_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, "base: &base {url: 'http://a:5984', request_timeout: 5}\n"
                 "couchdb:\n  <<: *base\n  url: http://b:5984\nstate_dir: state\n")
    problems: list[config.Problem] = []
    data = config.load_yaml(path, problems)
    assert not problems and data is not None
    assert data["couchdb"] == {"url": "http://b:5984", "request_timeout": 5}


# -- keys of the wrong type where a section goes


@pytest.mark.parametrize(("text", "expected"), [
    ("couchdb: [http://a:5984]\n", "couchdb: expected a mapping of keys (couchdb.ca_file, "
     "couchdb.failback_after, couchdb.password, ...), got a list"),
    ("couchdb: http://a:5984\n", "couchdb: expected a mapping of keys (couchdb.ca_file, "),
    ("couchdb: {url: 'http://a:5984'}\nshipping: fast\n", "shipping: expected a mapping of keys "),
    ("couchdb: {url: 'http://a:5984'}\nlog: debug\n", "log: expected a mapping of keys "
     "(log.format, log.level), got str"),
])
def test_a_section_that_is_no_mapping_says_so(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "state_dir: state\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert f"{path}: {expected}" in str(info.value)
    assert "unknown key" not in str(info.value)


def test_an_empty_section_is_no_section(tmp_path: Path) -> None:
    """`shipping:` with every key below it commented out means the defaults."""
    path = write(tmp_path, "couchdb: {url: 'http://a:5984'}\nshipping:\n#  linger: 1s\nlog:\n"
                 "spool:\nstate_dir: state\n",
                 sources={"s.yaml": "name: app\npaths: [/var/log/a.log]\nformat: json\n"
                          "multiline:\n"})
    cfg = config.load(path)
    assert cfg.shipping == config.ShippingConfig() and cfg.sources[0].multiline is None


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", ".Inf"])
@pytest.mark.parametrize("key", ["rotate_wait", "multiline.timeout"])
def test_a_duration_must_be_a_finite_number(tmp_path: Path, value: str, key: str) -> None:
    """YAML reads .nan and .inf as floats; a NaN timeout fires at once, every time."""
    extra = {"rotate_wait": f"rotate_wait: {value}\n",
             "multiline.timeout": f"multiline: {{start: '^x', timeout: {value}}}\n"}[key]
    path = write(tmp_path, sources={"s.yaml": "name: app\npaths: [/var/log/a.log]\nformat: json\n"
                                    + extra})
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert f"{key}: expected a duration of zero or more" in str(info.value)


def test_a_main_file_duration_must_be_finite(tmp_path: Path) -> None:
    path = write(tmp_path, "couchdb: {url: 'http://a:5984', request_timeout: .inf}\n"
                 "shipping: {linger: .nan}\nscan_interval: .nan\nstate_dir: state\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    text = str(info.value)
    assert all(f"{k}: expected a duration" in text
               for k in ("couchdb.request_timeout", "shipping.linger", "scan_interval"))


# -- status: a snapshot nested deeply is UNKNOWN, never a traceback


@pytest.mark.parametrize("depth", [300, 1000])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_deeply_nested_snapshot_is_unknown(tmp_path: Path, depth: int, as_json: bool) -> None:
    path = write(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text('{"pid": ' + "[" * depth + "]" * depth + "}")
    result = agent("status", "-c", str(path), *(["--json"] if as_json else []))
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("COUCHLOG UNKNOWN - the status file ") and not result.stderr


# -- one state_dir, one agent


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """Two agents on one state_dir would share temp files and spool segments (lines lost): the
    second is refused at start, and may start once the first has ended."""
    first = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from agent.offsets import StateFile; "
                              "StateFile(Path(sys.argv[1])).load(); print('locked', flush=True); "
                              "sys.stdin.read()", str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline() == "locked\n"
        (tmp_path / "offsets.json").write_bytes(b"kept")  # the first agent's offsets
        with pytest.raises(OSError, match=rf"state_dir {tmp_path} is in use by another agent "
                           rf"\(pid {first.pid}\); stop it, or give this one its own state_dir"):
            StateFile(tmp_path).load()
        with pytest.raises(OSError, match="is in use by another agent"):
            StateFile(tmp_path).save({"version": 1, "files": {}})
        assert (tmp_path / "offsets.json").read_bytes() == b"kept"
    finally:
        first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 0
    (tmp_path / "offsets.json").unlink()
    assert StateFile(tmp_path).load() == ({}, "absent")
    assert StateFile(tmp_path).load() == ({}, "absent")  # the same process may load again


# -- durable writes: whatever is left where the temp file goes


def test_a_fifo_left_as_the_status_temp_file_does_not_hang_the_agent(tmp_path: Path) -> None:
    """Opening a FIFO for writing waits for a reader: the agent's tick would wait with it."""
    status = StatusFile(tmp_path)
    os.mkfifo(durable.tmp_path(status.path))
    done: list[bool] = []
    writer = threading.Thread(target=lambda: done.append(status.write({"pid": 1})), daemon=True)
    writer.start()
    writer.join(HANG_GUARD)
    assert done == [True], "the status write hung on a FIFO"
    assert status.path.read_bytes() == b'{\n  "pid": 1\n}'


def test_a_symlink_left_as_the_offsets_temp_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the agent's")
    (tmp_path / "state").mkdir()
    state = StateFile(tmp_path / "state")
    durable.tmp_path(state.path).symlink_to(victim)
    state.save({"version": 1, "files": {}})
    assert victim.read_bytes() == b"not the agent's"
    assert state.load() == ({}, "ok") and not durable.tmp_path(state.path).exists()


@pytest.mark.parametrize("userinfo", ["admin:s3cr%ffet", "adm%c3in:s3cret", "admin:%e2%9c"])
def test_a_url_escape_that_is_no_utf8_is_refused_not_replaced(tmp_path: Path, userinfo: str) -> None:
    path = write(tmp_path, {"couchdb": {"url": f"http://{userinfo}@127.0.0.1:5984"},
                            "state_dir": "state"})
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    text = str(info.value)
    assert "couchdb.url: 'http://***@127.0.0.1:5984': a %XX escape in the user or password is " \
           "not UTF-8" in text
    assert "s3cr" not in text and "%e2" not in text


@pytest.mark.parametrize("where", ["paths", "state_dir"])
def test_a_symlink_loop_in_a_glob_or_state_dir_is_no_traceback(tmp_path: Path, where: str) -> None:
    (tmp_path / "loop").symlink_to("loop")
    main = {"couchdb": {"url": "http://127.0.0.1:5984"},
            "state_dir": "loop/state" if where == "state_dir" else "state"}
    glob = str(tmp_path / ("loop/*.log" if where == "paths" else "*.log"))
    path = write(tmp_path, main, sources={"s.yaml": {"name": "app", "paths": [glob],
                                                     "format": "json"}})
    result = agent("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("app: json") and "Traceback" not in result.stderr


# -- globs: ** never descends into a symlinked folder


def tree(root: Path) -> None:
    for name in ["a.log", "b.txt", ".hidden.log", "x/c.log", "x/y/d.log", "x/y/z/e.log",
                 ".h/f.log", "x/.h/g.log", "w[1]/h.log", "w[1]/v/i.log"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("line\n")


@pytest.mark.parametrize("pattern", ["**/*.log", "*/**/*.log", "x/**/y/**/*.log",
                                     "**/.h*", "**/y", "x/**/*.log", "w[[]1]/**/*.log",
                                     "*.log", "nothing/**/*.log", "**/e.log"])
def test_expand_matches_as_glob_does(tmp_path: Path, pattern: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tree(tmp_path)
    absolute = str(tmp_path / pattern)
    assert sorted(p.rstrip("/") for p in glob.glob(absolute, recursive=True)) == \
        sorted(expand(absolute, follow_symlinks=False))
    monkeypatch.chdir(tmp_path)
    assert sorted(p.rstrip("/") for p in glob.glob(pattern, recursive=True) if p) == \
        sorted(expand(pattern, follow_symlinks=False))


def test_symlinked_folders_cannot_make_a_glob_explode(tmp_path: Path) -> None:
    """Two links in a watched folder made `**` walk 2**40 paths: check never ended."""
    tree(tmp_path / "logs")
    (tmp_path / "logs" / "x" / "self").symlink_to(".")
    (tmp_path / "logs" / "x" / "up").symlink_to("..")
    pattern = str(tmp_path / "logs" / "**" / "*.log")
    assert sorted(expand(pattern, follow_symlinks=False)) == sorted(
        str(tmp_path / "logs" / p) for p in ["a.log", "x/c.log", "x/y/d.log", "x/y/z/e.log",
                                             "w[1]/h.log", "w[1]/v/i.log"])
    path = write(tmp_path, sources={"s.yaml": {"name": "app", "paths": [pattern],
                                               "format": "json"}})
    result = agent("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "1 glob(s), 6 file(s) now" in result.stdout


@pytest.mark.parametrize("follow", [False, True])
def test_the_agents_scan_is_not_made_to_explode_by_symlinked_folders(tmp_path: Path,
                                                                     follow: bool) -> None:
    tree(tmp_path)
    (tmp_path / "x" / "self").symlink_to(".")
    (tmp_path / "x" / "up").symlink_to("..")
    source = config.SourceConfig(name="app", file="s.yaml", follow_symlinks=follow,
                                 paths=(str(tmp_path / "**" / "*.log"),))
    found: list[list[str]] = []
    scanner = threading.Thread(target=lambda: found.append([f.path for f in scan([source])[0]]),
                               daemon=True)
    scanner.start()
    scanner.join(HANG_GUARD)
    assert found, "the scan never ended"
    assert sorted(found[0]) == sorted(str(tmp_path / p) for p in [
        "a.log", "x/c.log", "x/y/d.log", "x/y/z/e.log", "w[1]/h.log", "w[1]/v/i.log"])


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_fifo_or_symlink_as_the_dead_letter_file_is_refused_at_once(tmp_path: Path,
                                                                      kind: str) -> None:
    """A FIFO would hold the shipper's append until a reader comes; a link would have its
    target appended to. Either is a failed append (the documents stay unacknowledged)."""
    dead = DeadLetterFile(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    if kind == "fifo":
        os.mkfifo(dead.path)
    else:
        dead.path.symlink_to(victim)
    errors: list[OSError] = []

    def append() -> None:
        try:
            dead.append("log_app", [Rejection(Document("a:1", b'{"_id":"a:1"}', FILE, 1),
                                              "forbidden", "no")])
        except OSError as exc:
            errors.append(exc)

    appender = threading.Thread(target=append, daemon=True)
    appender.start()
    appender.join(HANG_GUARD)
    assert len(errors) == 1, "the append hung or succeeded"
    assert victim.read_bytes() == b""


def test_a_source_without_any_glob_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, sources={"s.yaml": "name: app\npaths: []\nformat: json\n"})
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert "paths: expected at least one glob" in str(info.value)


def test_a_dangling_symlink_in_conf_d_is_named_as_such(tmp_path: Path) -> None:
    path = write(tmp_path)
    (tmp_path / "conf.d" / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{tmp_path / 'conf.d' / 'gone.yaml'}: is a symlink to a missing file"


@pytest.mark.parametrize(("text", "shown"), [
    ("a: [b\nc: d\n", "expected ',' or ']', but got ':'"),
    ("a:\n  b: c\n d: e\n", "expected <block end>, but found '<block mapping start>'"),
    ("a:\n\tb: c\n", "found character '\\t' that cannot start any token"),
])
def test_yaml_errors_that_quote_no_value_are_shown_whole(tmp_path: Path, text: str,
                                                         shown: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    problems: list[config.Problem] = []
    assert config.load_yaml(path, problems) is None
    assert problems[0].message.endswith(shown), problems[0].message


@pytest.mark.parametrize("password", ["!Pa55'word", '!Pa55"word', "!Pa55\\word"])
def test_a_yaml_error_never_shows_a_password_with_quotes(tmp_path: Path, password: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"couchdb:\n  password: {password}\n")
    problems: list[config.Problem] = []
    assert config.load_yaml(path, problems) is None
    assert "Pa55" not in problems[0].message and "word" not in problems[0].message


@pytest.mark.parametrize("url", ["http://admin:S3cret9:couch.example:5984", "http://admin:S3cret9",
                                 "ftp://admin:S3cret9", "admin:S3cret9", "http://admin:S3cret9/db",
                                 "http://admin:123456789"])
def test_a_password_typed_with_a_colon_for_the_at_is_not_shown(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, {"couchdb": {"url": url}, "state_dir": "state"})
    result = agent("check", "-c", str(path))
    assert result.returncode == 2 and "couchdb.url: " in result.stderr, result.stderr
    assert "S3cret9" not in result.stderr and "123456789" not in result.stderr, result.stderr
