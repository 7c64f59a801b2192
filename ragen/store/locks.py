"""File locks of an index directory, on every platform: ``write.lock`` (one writer, its pid inside) and
``readers.lock`` (readers share it while they load a generation; the writer takes it exclusively only to
delete retired files).

On POSIX the locks are ``fcntl.flock`` locks: shared and exclusive, dropped by the kernel when the
process dies, so a killed writer never leaves a stale lock. Where ``fcntl`` is missing (Windows) they are
``filelock``'s descriptor locks (``LockFileEx``, also dropped with the process). Those are exclusive only,
so there readers take ``readers.lock`` one at a time for the moment they load; the guarantee is the same
(no reader loses the files it chose), loads just do not overlap. On Windows the holder's pid sits after a
blank first byte, because the locked byte cannot be read by others.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

HAVE_FLOCK = fcntl is not None  # False: the portable filelock locks (tests set it on Linux too)
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, getattr(errno, "EDEADLK", errno.EAGAIN))


def _filelock():
    import filelock

    return filelock


def _pid_offset() -> int:
    return 0 if HAVE_FLOCK else 1  # Windows locks byte 0: the pid lives after it


def try_exclusive(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it (shared or
    exclusive)."""
    if HAVE_FLOCK:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return False
            raise
        return True
    try:
        return bool(_filelock().lock_descriptor(fd, blocking=False))
    except OSError as exc:
        if exc.errno in _BUSY or getattr(exc, "winerror", None) in (33, 158):  # lock violation / not locked
            return False
        raise


def lock_shared(fd: int) -> None:
    """Wait for a shared lock on ``fd`` (exclusive where only exclusive locks exist, see the module)."""
    if HAVE_FLOCK:
        fcntl.flock(fd, fcntl.LOCK_SH)
    else:
        _filelock().lock_descriptor(fd, blocking=True, poll_interval=0.005)


def is_locked(path: Path) -> bool:
    """True while some process holds a lock on ``path`` (probed without keeping one)."""
    try:
        fd = os.open(path, os.O_RDONLY if HAVE_FLOCK else os.O_RDWR)
    except OSError:
        return False
    try:
        if HAVE_FLOCK:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            return False
        return not try_exclusive(fd)
    finally:
        os.close(fd)  # closing drops a probe's lock


def write_pid(fd: int) -> None:
    """Record this process as the holder (after truncating what a previous holder wrote)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b" " * _pid_offset() + f"{os.getpid()}\n".encode())


def read_pid(fd: int) -> str:
    """The pid a holder recorded in an open lock file, or ``unknown``."""
    try:
        os.lseek(fd, _pid_offset(), os.SEEK_SET)
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def read_pid_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "unknown"
    try:
        return read_pid(fd)
    finally:
        os.close(fd)
