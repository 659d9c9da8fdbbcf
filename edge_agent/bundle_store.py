"""The agent's bundle store: verified versions side by side, ``current`` and ``previous`` switched
atomically, so that a power loss at any point leaves a consistent, verified model to start on.

Layout (``root``)::

    versions/<version>/     a complete bundle, verified when it was installed
    current -> versions/X   symlink: what the agent runs
    previous -> versions/Y  symlink: what ``rollback`` returns to
    .staging-*/             an install in progress (removed by ``recover``)

:meth:`BundleStore.install` verifies the source (signature when keys are configured, every file's
SHA-256), refuses a downgrade unless pinned, copies into a staging directory, fsyncs every file and
the directory, verifies the copy, renames it into ``versions/`` and only then moves ``previous``,
then ``current`` (each a new symlink renamed over the old one). A crash before the last rename
leaves ``current`` where it was; after it, on the new version. :meth:`current` verifies what
``current`` points to and falls back to ``previous`` (logged) if it no longer checks out.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.bundle import Bundle, BundleError, load_bundle
from models.fsutil import fsync_dir
from models.signing import check_version_change, verify_bundle

__all__ = ["BundleStore", "BundleStoreError"]

log = logging.getLogger(__name__)


class BundleStoreError(RuntimeError):
    """No usable bundle, or an install refused; the message says why."""


class BundleStore:
    def __init__(self, root: Path, public_keys: Sequence[Any] | None = None, roles: Sequence[str] = ("onnx_int8",)):
        self.root = Path(root)
        self.keys = list(public_keys) if public_keys else None
        self.roles = tuple(roles)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.recover()

    # -- reading --------------------------------------------------------------------------------
    def _load(self, path: Path) -> Bundle:
        if self.keys:
            return verify_bundle(path, self.keys, roles=self.roles)
        return load_bundle(path, roles=self.roles, verify=True)

    def _target(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        return (self.root / os.readlink(link)).resolve()

    def current(self) -> Bundle:
        """The bundle to run: ``current`` if it verifies, else ``previous`` (which becomes current)."""
        errors = []
        for name in ("current", "previous"):
            target = self._target(name)
            if target is None:
                continue
            try:
                b = self._load(target)
            except BundleError as exc:
                errors.append(f"{name} -> {target.name}: {exc}")
                log.error("bundle store: %s -> %s does not verify: %s", name, target.name, exc)
                continue
            if name == "previous":
                log.error("bundle store: falling back to the previous bundle %s", b.manifest.version)
                self._link("current", target)
            return b
        raise BundleStoreError(f"{self.root}: no usable bundle" + (f" ({'; '.join(errors)})" if errors else ""))

    def current_version(self) -> str | None:
        target = self._target("current")
        return target.name if target is not None else None

    # -- changing -------------------------------------------------------------------------------
    def install(self, src: Path, pinned: str | None = None) -> Bundle:
        """Verify ``src``, copy it in durably, make it current (the old current becomes previous)."""
        incoming = self._load(Path(src))
        version = incoming.manifest.version
        check_version_change(self.current_version(), version, pinned)
        final = self.versions / version
        if not final.exists():
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            try:
                copy = staging / "b"
                shutil.copytree(src, copy)
                for f in copy.rglob("*"):
                    if f.is_file():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                fsync_dir(copy)
                self._load(copy)  # what landed on this disk, not what was sent
                os.replace(copy, final)
                fsync_dir(self.versions)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        installed = self._load(final)
        old = self._target("current")
        if old is not None and old != final.resolve():
            self._link("previous", old)
        self._link("current", final)
        log.info("bundle store: %s is current (previous: %s)", version, old.name if old else None)
        return installed

    def rollback(self) -> Bundle:
        """Make ``previous`` current again (and the current one previous)."""
        prev, cur = self._target("previous"), self._target("current")
        if prev is None:
            raise BundleStoreError(f"{self.root}: nothing to roll back to")
        b = self._load(prev)
        if cur is not None:
            self._link("previous", cur)
        self._link("current", prev)
        log.warning("bundle store: rolled back to %s", b.manifest.version)
        return b

    def recover(self) -> None:
        """Remove what an interrupted install or link switch left behind."""
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".link-*"):
            p.unlink(missing_ok=True)

    def _link(self, name: str, target: Path) -> None:
        tmp = self.root / f".link-{name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)
