"""Over-the-air model updates on the agent (issue 6).

The hub announces the version a station should run on the station's ``model`` topic (retained;
:class:`lineguard_contract.ModelAnnouncePayload`). :class:`ModelUpdater` takes the newest
announcement (older ones waiting are dropped), and in its own thread:

1. refuses a version older than the running one unless the announcement is ``pinned`` (an admin's
   rollback) -- before downloading anything;
2. downloads ``manifest.json`` and checks it against the announced SHA-256, then ``manifest.sig``
   and the files of the roles the agent runs, each into ``<store>/downloads/<version>/`` as
   ``<name>.part`` first; an interrupted download resumes with an HTTP ``Range`` request; a file
   whose SHA-256 differs from the manifest is deleted and the update refused;
3. installs through :class:`edge_agent.bundle_store.BundleStore` (signature against the provisioned
   keys, every hash, atomic ``current``/``previous`` switch that survives power loss);
4. hands the installed bundle to ``activate`` (the agent loads and warms the new detector beside
   the old one and swaps between batches: :class:`edge_agent.swap.SwappableDetector`). If that
   fails the store is rolled back and the old model keeps running.

Every refusal is logged with its reason and counted (``counters``). A failed download (the hub
or the network, transient) is retried with backoff (``retry_s``, then every last interval) until
it succeeds or a newer announcement replaces it; a refused version (downgrade, bad signature or
hash) is not retried until the hub announces again (or the agent restarts and gets the retained
announcement again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.bundle_store import BundleStore
from lineguard_contract import ContractError, ModelAnnouncePayload, decode
from models.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle
from models.signing import SignatureError, check_version_change

__all__ = ["BundleFetcher", "FetchError", "MissingPartError", "ModelUpdater"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 16


class FetchError(RuntimeError):
    """A download that did not produce the announced bytes; the message says which file and why."""


class MissingPartError(FetchError):
    """The announced bundle has no file for a part this agent runs (a split agent and a bundle
    without split parts): refused like a bad bundle, not retried."""


class BundleFetcher:
    """Files of a bundle over HTTP(S), resumable; ``token`` is sent as a bearer token."""

    def __init__(self, token: str | None = None, ca_file: Path | None = None, timeout: float = 30.0) -> None:
        self.token, self.timeout = token, timeout
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.bytes_downloaded = 0
        self.resumed = 0

    def _open(self, url: str, start: int = 0) -> Any:
        req = urllib.request.Request(url)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if start:
            req.add_header("Range", f"bytes={start}-")
        ctx = self.context if url.startswith("https:") else None
        return urllib.request.urlopen(req, timeout=self.timeout, context=ctx)  # noqa: S310 (http/https only)

    def get(self, url: str) -> bytes:
        try:
            with self._open(url) as r:
                data: bytes = r.read()
        except urllib.error.HTTPError as e:
            raise FetchError(f"{url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(f"{url}: {e}") from None
        self.bytes_downloaded += len(data)
        return data

    def download(self, url: str, dest: Path, sha256: str, size: int | None = None) -> Path:
        """``url`` into ``dest`` (via ``dest.part``, resumed if present); SHA-256 checked."""
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        try:
            with self._open(url, have) as r:
                if have and r.status != 206:  # the server ignored the range: start over
                    have = 0
                elif have:
                    self.resumed += 1
                with open(part, "ab" if have else "wb") as f:
                    while chunk := r.read(_CHUNK):
                        f.write(chunk)
                        self.bytes_downloaded += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and have == size:
                pass  # already complete
            else:
                raise FetchError(f"{url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(f"{url}: interrupted after {part.stat().st_size if part.exists() else 0} bytes "
                             f"({e}); the next attempt resumes") from None
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink()
            raise FetchError(f"{dest.name}: SHA-256 {h.hexdigest()[:12]}... is not the manifest's {sha256[:12]}...")
        os.replace(part, dest)
        return dest


class ModelUpdater:
    """``handle(payload)`` from the transport's thread; the work happens in :meth:`start`'s thread."""

    def __init__(self, store: BundleStore, fetcher: BundleFetcher, activate: Callable[[Bundle], None], *,
                 roles: tuple[str, ...] = ("onnx_int8",), pinned: str | None = None,
                 retry_s: tuple[float, ...] = (2.0, 5.0, 15.0, 60.0, 300.0)) -> None:
        self.store, self.fetcher, self.activate = store, fetcher, activate
        self.roles, self.pinned, self.retry_s = roles, pinned, retry_s
        self._retry: tuple[ModelAnnouncePayload, float, int] | None = None  # (announcement, due, attempt)
        self.counters: Counter[str] = Counter()
        self._last_counter: str | None = None
        self.last_error: str | None = None
        self._pending: ModelAnnouncePayload | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="model-updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def handle(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained announcement
        try:
            ann = decode("model", payload)
        except ContractError as e:
            self._refuse("malformed", f"announcement: {e}")
            return
        with self._cv:
            self._pending = ann  # the newest wins
            self._cv.notify_all()

    def _refuse(self, counter: str, reason: str) -> None:
        self._last_counter = counter
        self.counters[counter] += 1
        self.last_error = reason
        log.error("model update refused (%s): %s", counter, reason)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stop:
                    if self._retry is not None:
                        wait = self._retry[1] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cv.wait(wait)
                    else:
                        self._cv.wait()
                if self._stop:
                    return
                if self._pending is not None:  # a new announcement replaces a retry
                    ann, self._pending, attempt = self._pending, None, 0
                    self._retry = None
                else:
                    assert self._retry is not None
                    ann, _, attempt = self._retry
                    self._retry = None
                    self.counters["retries"] += 1
            assert ann is not None
            if not self.apply(ann) and self._last_counter == "download":
                delay = self.retry_s[min(attempt, len(self.retry_s) - 1)]
                with self._cv:
                    if self._pending is None:
                        self._retry = (ann, time.monotonic() + delay, attempt + 1)
                log.warning("model %s: download failed; retrying in %.0f s", ann.version, delay)

    def apply(self, ann: ModelAnnouncePayload) -> bool:
        """One announcement, synchronously; True when the announced version runs afterwards."""
        self._last_counter = None
        current = self.store.current_version()
        if ann.version == current:
            self.counters["already_current"] += 1
            return True
        pinned = ann.version if ann.pinned else self.pinned
        try:
            check_version_change(current, ann.version, pinned)
        except SignatureError as e:
            self._refuse("downgrade", str(e))
            return False
        dest = self.store.root / "downloads" / ann.version
        try:
            self._fetch(ann, dest)
        except MissingPartError as e:
            self._refuse("verify", str(e))
            return False
        except FetchError as e:
            self._refuse("download", str(e))
            return False
        try:
            bundle = self.store.install(dest, pinned=pinned)
        except Exception as e:  # SignatureError (bad or missing signature, wrong key), BundleError (a hash)
            self._refuse("verify", f"{ann.version}: {e}")
            shutil.rmtree(dest, ignore_errors=True)  # the bytes were wrong: fetch afresh next time
            return False
        try:
            self.activate(bundle)
        except Exception as e:
            self._refuse("activate", f"{ann.version} did not load: {e}; rolled back to the previous model")
            self.store.rollback()
            return False
        shutil.rmtree(dest, ignore_errors=True)
        self.counters["updated"] += 1
        self.last_error = None
        log.info("model %s (%s) is running", ann.version, ann.stage)
        return True

    def _fetch(self, ann: ModelAnnouncePayload, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        raw = self.fetcher.get(ann.base_url + MANIFEST_FILE)
        got = hashlib.sha256(raw).hexdigest()
        if got != ann.manifest_sha256:
            raise FetchError(f"manifest.json SHA-256 {got[:12]}... is not the announced {ann.manifest_sha256[:12]}...")
        manifest = json.loads(raw)
        if manifest.get("version") != ann.version:
            raise FetchError(f"manifest says version {manifest.get('version')}, the announcement {ann.version}")
        try:
            sig = self.fetcher.get(ann.base_url + SIGNATURE_FILE)
        except FetchError:
            sig = None  # an unsigned bundle: the store refuses it when keys are configured
        for role in self.roles:
            entry = manifest.get("files", {}).get(role)
            if entry is None:
                raise MissingPartError(f"{ann.version} has no {role} file (this agent runs {', '.join(self.roles)})")
            target = dest / entry["path"]
            if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == entry["sha256"]:
                continue
            self.fetcher.download(ann.base_url + entry["path"], target, entry["sha256"], entry.get("bytes"))
        (dest / MANIFEST_FILE).write_bytes(raw)
        if sig is not None:
            (dest / SIGNATURE_FILE).write_bytes(sig)
