"""`agent parse`: the seed's example, real logs (CRLF, invalid UTF-8), streaming, config sources."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

SEED_LINE = "2017-06-14 17:16:12,329 fail2ban.actions        [1112]: NOTICE  [sshd] Ban 59.45.175.88\n"
SEED_SCHEMA = r"$date $hour _ _ _ \[$process\] _ $ip"
BAN_REGEX = (r"^(?<date>\d{4}-\d{2}-\d{2}) (?<hour>[\d:,]+) fail2ban\.actions\s*(?:\[\d+\])?:"
             r"\s+NOTICE\s+\[(?<jail>[^\]]+)\]\s+Ban\s+(?<ip>\S+)")


def agent(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "agent", *args], input=stdin,
                          capture_output=True, timeout=60)


def documents(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_seed_example_prints_exactly_one_document() -> None:
    result = agent("parse", "--schema", SEED_SCHEMA, "--fields", "machine=server",
                   stdin=SEED_LINE.encode())
    assert result.returncode == 0, result.stderr
    assert documents(result.stdout) == [{"date": "2017-06-14", "process": "sshd", "machine": "server",
                                         "hour": "17:16:12,329", "ip": "59.45.175.88"}]
    assert result.stderr.decode().strip() == (
        "agent parse: 1 lines read, 1 kept, 0 filtered (0 empty), 0 not matched (kept raw), "
        "0 invalid UTF-8, 0 truncated")


def line_count(path: Path) -> int:
    data = path.read_bytes()
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def summary_numbers(stderr: bytes) -> dict[str, int]:
    words = stderr.decode().replace(",", "").replace("(", "").split()
    return {words[i + 1]: int(words[i]) for i in range(len(words) - 1) if words[i].isdigit()}


def test_ban_regex_on_every_fail2ban_layout_loses_no_line(reallogs: Path) -> None:
    path = reallogs / "fail2ban/logs/recidive"
    result = agent("parse", "--regex", BAN_REGEX, "--include", "Ban", path.as_posix())
    assert result.returncode == 0, result.stderr
    numbers = summary_numbers(result.stderr)
    docs = documents(result.stdout)
    assert numbers["lines"] == line_count(path)
    assert numbers["lines"] == numbers["kept"] + numbers["filtered"]
    assert len(docs) == numbers["kept"]
    parsed = [d for d in docs if "agent" not in d]
    assert {d["ip"] for d in parsed} >= {"1.2.3.4"}
    assert all(set(d) == {"date", "hour", "jail", "ip"} for d in parsed)


def test_crlf_files_lose_no_line_and_keep_no_cr(reallogs: Path) -> None:
    for path in sorted((reallogs / "loghub").glob("*/*_2k.log")):
        result = agent("parse", "--schema", "$first $rest...", path.as_posix())
        assert result.returncode == 0, result.stderr
        docs = documents(result.stdout)
        numbers = summary_numbers(result.stderr)
        assert numbers["lines"] == line_count(path), path
        assert len(docs) == numbers["kept"] == numbers["lines"] - numbers["filtered"], path
        assert not any(str(d.get("rest", d.get("message", ""))).endswith("\r") for d in docs), path


def test_invalid_encoding_is_kept_and_counted(reallogs: Path) -> None:
    path = reallogs / "fail2ban/testcase01.log"
    result = agent("parse", "--schema", "$month $day $time $host $message...", path.as_posix())
    assert result.returncode == 0, result.stderr
    docs = documents(result.stdout)
    assert len(docs) == line_count(path)
    assert docs[0]["month"] == "D\ufffdc"
    assert summary_numbers(result.stderr)["invalid"] == 3


def test_unmatched_lines_print_raw_with_marker_or_are_dropped() -> None:
    lines = b"a Ban 1\ngarbage\n"
    kept = agent("parse", "--schema", "$x Ban $ip", stdin=lines)
    assert documents(kept.stdout)[1] == {"message": "garbage",
                                         "agent": {"parse_error": "line does not match the schema"}}
    dropped = agent("parse", "--schema", "$x Ban $ip", "--drop-unmatched", stdin=lines)
    assert len(documents(dropped.stdout)) == 1
    assert "1 not matched (dropped)" in dropped.stderr.decode()


def test_output_streams_as_input_arrives() -> None:
    process = subprocess.Popen([sys.executable, "-m", "agent", "parse", "--schema", "$a"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"first\n")
    process.stdin.flush()
    started = time.monotonic()
    assert json.loads(process.stdout.readline()) == {"a": "first"}
    assert time.monotonic() - started < 30
    process.stdin.close()
    process.wait(timeout=30)


def test_parse_with_a_source_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({"couchdb": {"url": "http://127.0.0.1:5984"}}))
    (tmp_path / "conf.d" / "f.yaml").write_text(yaml.safe_dump({
        "name": "fail2ban", "paths": ["/var/log/fail2ban.log"], "schema": SEED_SCHEMA,
        "include": ["NOTICE", "Ban"], "fields": {"machine": "server"}}))
    log = tmp_path / "sample.log"
    log.write_text(SEED_LINE + SEED_LINE.replace("NOTICE", "INFO"))
    result = agent("parse", "-c", str(tmp_path / "agent.yaml"), "--source", "fail2ban", str(log))
    assert result.returncode == 0, result.stderr
    assert [d["ip"] for d in documents(result.stdout)] == ["59.45.175.88"]
    missing = agent("parse", "-c", str(tmp_path / "agent.yaml"), "--source", "nope", str(log))
    assert missing.returncode == 2 and b"no source named 'nope' (sources: fail2ban)" in missing.stderr


def test_usage_errors_exit_2() -> None:
    assert agent("parse", stdin=b"x\n").returncode == 2
    bad = agent("parse", "--schema", "$a$b", stdin=b"x\n")
    assert bad.returncode == 2 and b"agent parse: schema: captures '$a' and '$b' touch" in bad.stderr


def test_missing_input_file_is_reported() -> None:
    result = agent("parse", "--schema", "$a", "/nonexistent/file.log")
    assert result.returncode == 1
    assert b"cannot read /nonexistent/file.log: No such file or directory" in result.stderr
