"""
The files mailrelay keeps under ``data_dir`` (the database, message bodies, the spool, the
self-signed key) hold password and API-key hashes and customers' messages: they are the relay
user's alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from twisted.logger import Logger

log = Logger()


def keepFilesPrivate() -> None:
    """Make every file and directory this process creates from now on readable by its user
    only (umask 077), whatever umask it was started with."""
    os.umask(0o077)


def warnIfShared(directory: Path) -> None:
    """Log a warning if ``directory`` (data_dir) lets its group or others in: files made
    before mailrelay set its umask (or by another program) would be readable there."""
    try:
        mode = directory.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warn(
            "data_dir {path} is open to its group or others (mode {mode:o}); it holds password "
            "hashes and messages: chmod 700 it",
            path=str(directory),
            mode=stat.S_IMODE(mode),
        )


def writePrivately(path: Path, data: bytes) -> None:
    """
    Write ``data`` to ``path`` with mode 0600, all at once or not at all: into a new temporary
    file beside it (``O_EXCL | O_NOFOLLOW``: never through a symbolic link or into a file
    that exists, whose mode would be kept), synced, then renamed over ``path``.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def handOver(directory: Path, uid: int, gid: int) -> int:
    """
    Give ``directory`` and what root owns inside it (the data directory, its spool, a
    self-signed key made at start, a database made by the admin command line run as root) to
    ``uid``/``gid``: what ``twistd --uid/--gid`` runs the relay as once it has bound its
    ports. Symbolic links are neither followed nor changed. Returns how many were changed.
    """
    changed = 0
    for path in _rootOwned(directory):
        os.chown(path, uid, gid, follow_symlinks=False)
        changed += 1
    return changed


def _rootOwned(directory: Path) -> Iterator[Path]:
    if directory.is_symlink() or not directory.is_dir():
        return
    if directory.lstat().st_uid == 0:
        yield directory
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = Path(root, name)
            info = path.lstat()
            if info.st_uid == 0 and not stat.S_ISLNK(info.st_mode):
                yield path
