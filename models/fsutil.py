"""Atomic file writes (bundle manifests, the hub's job states and gate reports): a temp file in the
same directory, fsync, rename over the target. A crash leaves the old file or the new one. And
:func:`link_or_copy`, for snapshots of files that are replaced, never edited, in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir", "link_or_copy"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, doc: Any, indent: int = 1) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=indent, default=str) + "\n").encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: str, dst: str) -> None:
    """``dst`` as a hard link to ``src`` where both are on one file system, else a copy (a
    ``shutil.copytree`` ``copy_function``: a snapshot of files that are later replaced, not edited)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
