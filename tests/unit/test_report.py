"""The pure parts of agent/report.py: the shipped files, query planning, rendering, comparing."""

from __future__ import annotations

import base64
import hashlib
import json
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from agent import report
from agent.report import ReportError, find_view, load_designs, plan, requests

ROOT = Path(__file__).resolve().parents[2]


def decoded(params: dict[str, str]) -> dict[str, object]:
    return {k: json.loads(v) if k in ("startkey", "endkey") else v for k, v in params.items()}


def test_the_seed_design_document_is_the_seed_javascript() -> None:
    views = report.design_documents()["_design/report"]["views"]
    assert views["attacks"]["map"] == (
        "function(doc) { var date = new Date(doc.date); emit([doc.machine, date.getFullYear(), "
        "date.getMonth(), date.getDate()], 1) }")
    assert views["attacks"]["reduce"] == "_count"
    assert views["attackers"] == {"map": "function(doc) { emit(doc.date, [doc.ip, doc.process]) }"}
    assert views["attacks_per_ip"]["map"] == views["ip_counts"]["map"] == \
        "function(doc) { emit([doc.ip], 1) }"


def test_every_report_and_dashboard_file_ships_as_package_data() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["agent"]
    folder = ROOT / "agent"
    files = [p.relative_to(folder).as_posix() for sub in ("reports", "dashboard")
             for p in (folder / sub).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files
    missing = [f for f in files if not any(
        PurePosixPath(f).match(g) and len(PurePosixPath(f).parts) == len(PurePosixPath(g).parts)
        for g in globs)]
    assert missing == []


def test_a_time_range_over_the_seed_key_runs_once_per_machine() -> None:
    view = find_view(load_designs(), "attacks")
    query = plan(view, group_level=4, since="2017-06-01", until="2017-06-11")
    assert report.needs_prefixes(query)
    got = [decoded(p) for p in requests(query, [["server"], ["web"]])]
    assert got == [
        {"reduce": "true", "group_level": "4", "startkey": ["server", 2017, 5, 1],
         "endkey": ["server", 2017, 5, 11, {}]},
        {"reduce": "true", "group_level": "4", "startkey": ["web", 2017, 5, 1],
         "endkey": ["web", 2017, 5, 11, {}]}]


def test_ranges_without_since_start_at_the_first_date_and_until_covers_its_day() -> None:
    designs = load_designs()
    (attackers,) = requests(plan(find_view(designs, "attackers"), until="2017-06-01"))
    # The key is a plain string: a range that leaves out documents without a date (null).
    assert decoded(attackers) == {"startkey": "0001-01-01", "endkey": "2017-06-01\ufff0"}
    (hours,) = requests(plan(find_view(designs, "docs_per_hour"), since="2026-11-30",
                             until="2026-11-30"))
    assert decoded(hours)["startkey"] == ["2026-11-30T00"]
    assert decoded(hours)["endkey"] == ["2026-11-30T23", {}]
    (precise,) = requests(plan(find_view(designs, "docs_per_hour"), until="2026-11-30T05"))
    assert decoded(precise)["endkey"] == ["2026-11-30T05", {}]


def test_options_that_do_not_fit_the_view_are_usage_errors() -> None:
    designs = load_designs()
    for name, options in [("attacks", {"by": "hour"}), ("attacks_per_ip", {"since": "2017-06-01"}),
                          ("top_values", {}), ("attacks", {"field_name": "ip"}),
                          ("attackers", {"group_level": 1}), ("attacks", {"group_level": 5}),
                          ("attacks", {"since": "June"})]:
        with pytest.raises(ReportError) as caught:
            plan(find_view(designs, name), **options)  # type: ignore[arg-type]
        assert caught.value.usage, (name, options)
    with pytest.raises(ReportError):
        find_view(designs, "nosuch")


def test_top_values_ranks_within_the_chosen_field() -> None:
    query = plan(find_view(load_designs(), "top_values"), field_name="ip", top=2)
    (params,) = requests(query)
    assert decoded(params) == {"reduce": "true", "group_level": "2", "startkey": ["ip"],
                               "endkey": ["ip", {}]}
    rows = [{"key": ["ip", "a"], "value": 1}, {"key": ["ip", "b"], "value": 5},
            {"key": ["ip", "c"], "value": 3}]
    assert [r["key"][1] for r in report.finish(query, rows)] == ["b", "c"]


def test_renderings() -> None:
    view = find_view(load_designs(), "attacks")
    rows = [{"key": ["server", 2017, 5, 11], "value": 4}, {"key": ["server", 2017, 5, 12], "value": 2}]
    assert report.render_csv(view, rows) == (
        "machine,year,month0,day,value\nserver,2017,5,11,4\nserver,2017,5,12,2\n")
    assert json.loads(report.render_json(rows)) == rows
    plain = report.render_table(view, rows, colour=False, bar_width=10).splitlines()
    assert plain[1].endswith("4  " + "█" * 10) and plain[2].endswith("2  " + "█" * 5)
    assert "\x1b[36m" in report.render_table(view, rows, colour=True)
    objects = report.expand_object([{"key": None, "value": {"1.2.3.4": 3, "5.6.7.8": 1}}])
    assert objects == [{"key": ["1.2.3.4"], "value": 3}, {"key": ["5.6.7.8"], "value": 1}]


def test_same_document_ignores_rev_and_compares_attachments_by_digest() -> None:
    data = b"<html></html>"
    wanted = {"_id": "_design/dashboard", "language": "javascript", "_attachments": {
        "index.html": {"content_type": "text/html", "data": base64.b64encode(data).decode()}}}
    digest = "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()
    stored = {"_id": "_design/dashboard", "_rev": "3-abc", "language": "javascript",
              "_attachments": {"index.html": {"content_type": "text/html", "digest": digest,
                                              "stub": True, "length": len(data)}}}
    assert report.same_document(stored, wanted)
    stored["_attachments"]["index.html"]["digest"] = "md5-other"
    assert not report.same_document(stored, wanted)
    assert not report.same_document(None, wanted)
    assert report.same_document({"_rev": "1-x", **report.design_documents()["_design/report"]},
                                report.design_documents()["_design/report"])


def test_freshness_from_opaque_and_integer_sequences() -> None:
    assert report.freshness(120, 100) == 20
    assert report.freshness("1500-g1AAAAB", "1450-g1AAAAC") == 50
    assert report.freshness("opaque", 3) is None


def test_credentials_in_a_url_go_to_the_header_and_never_into_messages() -> None:
    couch = report.Couch("http://reader:s3cret@127.0.0.1:9/")
    assert couch.url == "http://127.0.0.1:9"
    with pytest.raises(ReportError) as caught:
        couch.get("/log_x")  # nothing listens on port 9
    assert "s3cret" not in str(caught.value) and "127.0.0.1:9" in str(caught.value)


def test_no_rows() -> None:
    view = find_view(load_designs(), "attacks")
    assert report.render_table(view, [], colour=False) == "(no rows)\n"
    assert report.render_csv(view, []) == "machine,year,month0,day,value\n"
    assert report.render_json([]) == "[]\n"
