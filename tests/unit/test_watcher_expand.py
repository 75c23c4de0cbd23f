"""How `**` is expanded (issue 13 review): like `glob`, but never through a symlink loop, never
into a symlinked folder without follow_symlinks, and without recursion."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from agent.config import Problem, SourceConfig, source_from_mapping
from agent.globs import expand
from agent.watcher import scan


def source(**keys: Any) -> SourceConfig:
    problems: list[Problem] = []
    made = source_from_mapping("s.yaml", {"name": "s", "schema": "$m...", **keys}, problems)
    assert made is not None, problems
    return made


def test_expand_matches_what_glob_matches_in_a_tree_without_links(tmp_path: Path) -> None:
    for name in ("x.log", "a/y.log", "a/b/z.log", "a/b/.hidden/w.log", ".q.log", "a/b/c/z.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    for pattern in ("**/*.log", "*/**/*.log", "**/b/*.log", "a/**/**/*.log", "**/z.log",
                    "a/*/*.log", "*.log"):
        full = str(tmp_path / pattern)
        assert sorted(set(expand(full))) == sorted(set(glob.glob(full, recursive=True))), pattern


def test_a_symlinked_folder_is_one_skip_not_a_walk_of_its_target(tmp_path: Path) -> None:
    """`ln -s / logs/root` made every scan walk the whole file system (and report each file
    in it as skipped) when follow_symlinks is false, which is when nothing there is read."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for n in range(200):
        (elsewhere / f"{n}.log").touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").touch()
    (logs / "root").symlink_to(elsewhere)
    found, skipped = scan([source(paths=[str(logs / "**" / "*.log")])])
    assert [f.path for f in found] == [str(logs / "app.log")]
    assert [s.path for s in skipped] == [str(logs / "root")]
    found, skipped = scan([source(paths=[str(logs / "**" / "*.log")], follow_symlinks=True)])
    assert len(found) == 201 and not skipped
