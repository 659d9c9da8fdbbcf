"""Content-addressed blob storage for sample images, behind a small interface.

A blob's key is the SHA-256 of its bytes (64 lowercase hex digits), so putting the same bytes
twice stores them once and a key always names the same content. :class:`FileBlobStore` keeps
``<root>/ab/cd/<sha>.jpg``; a write goes to a temporary file in the same directory, is fsynced
and renamed into place (``os.replace``), so a reader never sees a partial blob and a crash
leaves at most a stray temporary file. An S3-compatible store can implement the same interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from models.fsutil import fsync_dir

__all__ = ["BlobStore", "FileBlobStore", "sha256_hex"]

_SHA = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(sha: str) -> str:
    if not _SHA.match(sha):
        raise ValueError(f"{sha!r} is not a SHA-256 key (64 lowercase hex digits)")
    return sha


class BlobStore(ABC):
    """Immutable blobs keyed by the SHA-256 of their content."""

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent, durable on return) and return its key."""

    @abstractmethod
    def get(self, sha: str) -> bytes:
        """The bytes of ``sha``; KeyError when absent."""

    @abstractmethod
    def exists(self, sha: str) -> bool: ...


class FileBlobStore(BlobStore):
    def __init__(self, root: Path | str, suffix: str = ".jpg", fsync: bool = True) -> None:
        self.root = Path(root)
        self.suffix = suffix
        self.fsync = fsync

    def path(self, sha: str) -> Path:
        _check(sha)
        return self.root / sha[:2] / sha[2:4] / f"{sha}{self.suffix}"

    def put(self, data: bytes) -> str:
        sha = sha256_hex(data)
        target = self.path(sha)
        if target.exists():
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=self.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic; a racing writer of the same key writes the same bytes
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            fsync_dir(target.parent)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha) from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()


