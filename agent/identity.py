"""File identity: device + inode + a fingerprint of the first line.

The fingerprint covers the file's first line, at most `FINGERPRINT_BYTES`;
in an append-only file those bytes never change, so the identity can be
recomputed after a restart from the file alone. A file whose first line is
not complete yet (and shorter than the window) has no identity yet: it has
no complete line to ship either, so it waits for one, however short the
file stays. This is how files shorter than the window are followed.
"""

from __future__ import annotations

import hashlib
import os

from agent.types import FileId

FINGERPRINT_BYTES = 1024


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


def identify(fd: int) -> FileId | None:
    """Identity of the open file `fd`, or None while its first line is incomplete. Blocking."""
    st = os.fstat(fd)
    fp = fingerprint(os.pread(fd, FINGERPRINT_BYTES, 0))
    return None if fp is None else FileId(st.st_dev, st.st_ino, fp)
