"""Glob expansion that an attacker with write access to a watched folder cannot turn into a
hang: `**` never walks a folder twice on one path, enters symlinked folders only when asked,
and walks trees of any depth without recursion. Used by the watcher's scan and `agent check`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
from collections.abc import Iterator


def expand(pattern: str, follow_symlinks: bool = True,
           pruned: list[str] | None = None) -> Iterator[str]:
    """The paths `pattern` matches, as `glob.iglob(pattern, recursive=True)` gives them, except
    that a `**` enters a folder only if it is not already on the way there, and a symlinked
    folder only with `follow_symlinks` (the links it does not enter are added to `pruned`).
    Under `**`, `glob` follows symlinked folders: two links to `..` made it walk 2^40 paths
    (a scan that never ended, with the memory it held), one link to `/` the whole file system
    at every scan, and a tree 1,000 folders deep made it recurse into a RecursionError.
    Blocking."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        yield from glob.iglob(pattern)
        return
    at = parts.index("**")
    prefix, rest = os.sep.join(parts[:at]), os.sep.join(parts[at + 1:])
    bases = glob.iglob(prefix) if prefix else [os.sep if at else ""]
    for base in bases:
        for folder, entries in _walk(base, follow_symlinks, pruned):
            if not rest:
                yield from entries
            else:
                yield from expand(os.path.join(glob.escape(folder), rest), follow_symlinks,
                                  pruned)


def _walk(base: str, follow_symlinks: bool,
          pruned: list[str] | None) -> Iterator[tuple[str, list[str]]]:
    """Each folder at or below `base` that `**` stands for (hidden ones excepted, as `glob`
    does), with the paths of its entries; a folder already on the way there (a symlink loop)
    is not entered again, nor a symlinked one without `follow_symlinks` (added to `pruned`).
    Depth-first without recursion, so a tree of any depth is walked."""
    try:
        top = os.stat(base or ".")
    except OSError:
        return
    if not stat.S_ISDIR(top.st_mode):
        return
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [
        (base, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, above = stack.pop()
        entries, folders = [], []
        try:
            with os.scandir(folder or ".") as listing:
                for entry in listing:
                    if entry.name.startswith("."):
                        continue
                    path = os.path.join(folder, entry.name)
                    entries.append(path)
                    with contextlib.suppress(OSError):
                        if entry.is_dir():
                            if not follow_symlinks and entry.is_symlink():
                                if pruned is not None:
                                    pruned.append(path)
                                continue
                            st = entry.stat()
                            if (st.st_dev, st.st_ino) not in above:
                                folders.append((path, above | {(st.st_dev, st.st_ino)}))
        except OSError:
            continue
        yield folder, entries
        stack.extend(reversed(folders))
