"""Durable writes, in one place: every byte written, fsynced, and (for a replaced file) renamed
into place with its folder fsynced.

`os.write` may write fewer bytes than asked without raising: on a nearly full tmpfs it wrote
8,192 of 30,029 bytes of `offsets.json`, and the truncated file was renamed into place. Every
writer of agent state goes through `write_all`, which keeps writing until all is written or the
kernel raises (ENOSPC, say), so a partial write is never mistaken for a complete one.

`read_regular_file` is the safe read of such a file (and of the configuration): it never
blocks on a FIFO and never reads an endless device.

All functions block (write, fsync, rename): call them through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many calls it takes; raise OSError if the kernel
    stops taking bytes."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            # No progress and no error: a full device that says so this way would loop forever.
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (write took no bytes)")
        view = view[written:]


def append(fd: int, data: bytes) -> None:
    """Append all of `data` to an O_APPEND descriptor and fsync it: when this returns, the
    bytes survive a crash. On OSError some bytes may be written; the caller cuts them off if
    its format needs that (the spool does)."""
    write_all(fd, data)
    os.fsync(fd)


def append_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Append all of `data` to the file at `path` (created with `mode` if missing) and fsync
    it, and its folder when the file is new (so that the file itself survives a crash). On
    OSError the file is cut back to its old size: no torn record is left for the next one to
    follow. Callers that share the file between threads hold a lock around this: the cut
    assumes no one else appended meanwhile."""
    # Non-blocking and no link followed: a FIFO left at `path` would hold the open until a
    # reader comes, and a symlink would have its target appended to.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW
                 | os.O_CLOEXEC, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)", str(path))
        size = info.st_size
        try:
            append(fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if size == 0:
        fsync_folder(path.parent)


def replace_file(path: Path, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Make `data` the content of `path` atomically: a reader sees the old content or all of
    the new, never a part. Temp file (`path` + `.tmp`), all bytes written, fsync, rename, fsync
    of the folder. `sync=False` skips both fsyncs, for a file that is rewritten every few
    seconds and whose loss in a power cut costs nothing (status.json): it is still never
    renamed into place short. On OSError the temp file is removed and `path` is untouched."""
    tmp = tmp_path(path)
    try:
        # A new temp file each time, never one found there: opening a FIFO left in its place
        # for writing would wait forever for a reader (the agent's tick with it), and a symlink
        # there would have its target truncated and rewritten. O_EXCL follows no link.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off `mode`
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # A partial temp file would waste the space that ran out, and look like a newer state.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync:
        fsync_folder(path.parent)


def tmp_path(path: Path) -> Path:
    """The temp file `replace_file` writes before renaming it to `path`."""
    return path.with_name(path.name + ".tmp")


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular_file(path: Path, max_bytes: int | None) -> bytes:
    """The content of the regular file at `path`, or OSError; never blocks, never reads more
    than `max_bytes`. A plain read would wait forever on a FIFO put in a file's place and
    fill memory from a link to /dev/zero; this opens without blocking and reads only a regular
    file (checked on the open descriptor, not the path) no larger than `max_bytes`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)", str(path))
        chunks = []
        size = 0
        # Read to the end rather than trust st_size: the file may grow while it is read.
        while chunk := os.read(fd, 64 * 1024):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
