"""A real, tiny tmpfs for tests of full disks and short writes (needs root and mount rights)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on a new folder; skips the test if it cannot be mounted."""
    folder = Path(tempfile.mkdtemp(prefix="couchlog-tmpfs-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(folder)], capture_output=True, check=False)
    except FileNotFoundError:
        mounted = None
    if mounted is None or mounted.returncode != 0:
        folder.rmdir()
        pytest.skip("cannot mount a tmpfs here: "
                    f"{mounted.stderr.decode().strip() if mounted else 'no mount command'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder`, then free `leave` bytes of it; return the filler file
    (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    size = 0
    try:
        while True:
            size += os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    os.ftruncate(fd, size - leave)
    os.close(fd)
    return filler
