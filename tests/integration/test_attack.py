"""Attacks on the running agent (issue 13 review): trees, links and files a careless or hostile
user can put under the globs. Each test compares the exact multiset of documents in the
database with the lines written."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.couch import CouchDB
from tests.integration.harness import Pipeline, append, numbered

pytestmark = pytest.mark.integration


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "logs"
    folder.mkdir()
    yield folder
    # pytest's own clean-up recurses, and fails on a tree 1,200 folders deep; rm does not.
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def pipeline(tmp_path: Path, couch: CouchDB, couchdb_url: str, database: str,
             **source: Any) -> Pipeline:
    return Pipeline(tmp_path, couch, couchdb_url, database, [{"name": "s", **source}])


def deep_tree(top: Path, depth: int) -> Path:
    """`top/d/d/.../d` (`depth` folders), made through descriptors: its path is longer than
    any one call may name."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        log = os.open("deep.log", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(log, b"a line at the bottom\n")
        os.close(log)
    finally:
        os.close(fd)
    return top / "d"


@pytest.mark.parametrize("follow_symlinks", [False, True])
def test_symlink_loops_under_doublestar_do_not_hang_discovery(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str,
        follow_symlinks: bool) -> None:
    """`glob` follows symlinked folders under `**`: two links to `..` made the first scan walk
    2^40 paths, so the agent never finished starting (and its memory grew)."""
    (logs / "app").mkdir()
    (logs / "app" / "up").symlink_to("..")
    (logs / "app" / "again").symlink_to("..")
    written = append(logs / "app" / "app.log", numbered("app", 0, 300))
    flow = pipeline(tmp_path, couch, couchdb_url, database, paths=[str(logs / "**" / "*.log")],
                    follow_symlinks=follow_symlinks).start()
    written += append(logs / "new.log", numbered("new", 0, 300))
    flow.wait_for(written)
    flow.stop()


def test_a_deep_tree_under_doublestar_neither_crashes_nor_stops_discovery(
        tmp_path: Path, logs: Path, couch: CouchDB, couchdb_url: str, database: str) -> None:
    """A tree 1,200 folders deep: watchdog's recursive watch (os.walk) and `glob`'s `**` both
    recursed into a RecursionError, so the agent failed at start as if it had a bug; with
    inotify out of the way, the scan still failed and no file of the source was followed."""
    deep_tree(logs, 1200)
    written = append(logs / "app.log", numbered("app", 0, 300))
    written["a line at the bottom"] += 1
    flow = pipeline(tmp_path, couch, couchdb_url, database,
                    paths=[str(logs / "**" / "*.log")]).start()
    written += append(logs / "new.log", numbered("new", 0, 300))
    flow.wait_for(written)
    flow.stop()
