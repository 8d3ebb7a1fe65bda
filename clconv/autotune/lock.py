"""An exclusive lock between processes, held on a side file (<path>.lock) while a cache file
is read, merged and replaced. POSIX flock, or msvcrt on Windows."""
from __future__ import annotations

import os
from contextlib import contextmanager

try:
    import fcntl
except ImportError:     # Windows
    fcntl = None
    import msvcrt


@contextmanager
def locked(path):
    """Hold an exclusive lock on `path`.lock for the duration of the with-block."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises OSError
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)
