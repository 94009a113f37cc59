"""Small file helpers shared by every area that writes or checks files.

:func:`atomic_write` is the project's one crash-safe write: a temp file in the target's
directory, fsynced, renamed over the target, the directory fsynced. A crash leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

#: Prefix of the temp files :func:`atomic_write` leaves only when the process dies mid-write.
TEMP_PREFIX = ".tmp-"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike[str],
                 writer: Callable[[Path], None]) -> tuple[str, int]:
    """Write ``target`` through ``writer(temp_path)`` atomically; return (sha256, size).

    temp file in the same directory -> fsync -> rename over ``target`` -> fsync directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return digest, size


def atomic_write_text(target: str | os.PathLike[str], text: str) -> tuple[str, int]:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> tuple[str, int]:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(target, lambda p: p.write_bytes(data))
