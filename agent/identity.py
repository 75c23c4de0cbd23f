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

import hashlib
import os

FINGERPRINT_BYTES = 1024
MARKER_BYTES = 128


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
