"""File identity and offset markers: pure functions over bytes read from a file.

The identity is device + inode + a fingerprint of the first line, at most
`FINGERPRINT_BYTES`; in an append-only file those bytes never change, so
the identity can be recomputed after a restart from the file alone. A file
whose first line is not complete yet (and shorter than the window) has no
identity yet: it has no complete line to ship either, so it waits for one,
however short the file stays. That is how files shorter than the window
are followed.

A marker is a hash of the `MARKER_BYTES` before an offset. Saved with the
offset, it tells on resume whether the bytes before the offset are still
the ones that were read (otherwise the file was rewritten in place), and
whether a file with another inode is a copy of one already read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

FINGERPRINT_BYTES = 1024
MARKER_BYTES = 128
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
"""How a followed file is opened. O_NONBLOCK: opening a FIFO for reading otherwise waits for
a writer, forever; on a regular file it changes nothing, so it is kept. O_NOCTTY: a terminal
device never becomes the agent's controlling terminal."""


class NotFollowable(Exception):
    """What a path names is not a regular file the source may follow; `reason` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def file_kind(mode: int) -> str:
    """What a stat mode is, as a skip reason says it."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "unknown file type"


def open_regular(path: str, follow_symlinks: bool) -> tuple[int, os.stat_result]:
    """Open `path` for reading if it is a regular file (checked on the opened descriptor, so a
    FIFO or a symlink renamed over the path after a scan is never read); with
    `follow_symlinks`, a symlink to a regular file is one. Raises NotFollowable or OSError.
    Blocking (on a hung NFS mount, for as long as the mount hangs)."""
    try:
        fd = os.open(path, OPEN_FLAGS | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotFollowable("symlink loop" if follow_symlinks else "symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotFollowable(file_kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def fingerprint(head: bytes) -> str | None:
    """Fingerprint of a file from its first bytes (at least the first line or the whole window)."""
    newline = head.find(b"\n", 0, FINGERPRINT_BYTES)
    if newline >= 0:
        head = head[: newline + 1]
    elif len(head) < FINGERPRINT_BYTES:
        return None
    else:
        head = head[:FINGERPRINT_BYTES]
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def read_fingerprint(fd: int) -> str | None:
    """The open file's fingerprint, or None while its first line is incomplete. Blocking."""
    return fingerprint(os.pread(fd, FINGERPRINT_BYTES, 0))


def marker(before: bytes) -> str:
    """Marker of an offset, from the bytes just before it (only the last MARKER_BYTES count)."""
    return hashlib.blake2b(before[-MARKER_BYTES:], digest_size=8).hexdigest()


def read_marker(fd: int, offset: int) -> str:
    """Marker of `offset` in the open file. Blocking."""
    start = max(0, offset - MARKER_BYTES)
    return marker(os.pread(fd, offset - start, start))


def last_line_end(fd: int, size: int, newline: bytes = b"\n", block: int = 64 * 1024) -> int:
    """Offset just past the last newline before `size` (0 if none), the newline aligned to its
    own length (a UTF-16 newline starts at an even offset). Blocking."""
    unit = len(newline)
    end = size
    while end > 0:
        start = max(0, end - block - unit + 1)
        data = os.pread(fd, end - start, start)
        found = data.rfind(newline)
        while found >= 0 and (start + found) % unit:
            found = data.rfind(newline, 0, found + unit - 1)
        if found >= 0:
            return start + found + unit
        end = start + unit - 1 if start > 0 else 0
    return 0
