"""Ed25519 signatures of model bundles (no torch; agents verify, the hub signs).

The manifest pins every file of a bundle by SHA-256 and size, so one detached signature of the
manifest's exact bytes (``manifest.sig``, 64 raw bytes) covers the whole bundle:

- :func:`sign_bundle` (the hub, holding the private key) writes ``manifest.sig`` atomically;
- :func:`verify_bundle` (an agent, provisioned with one or more public keys) checks the signature
  over the manifest bytes, then every file's hash and size (:func:`models.bundle.load_bundle`),
  and returns the loaded bundle, or raises :class:`SignatureError` saying which check failed;
- :func:`check_version_change` refuses a downgrade unless an admin pinned that version.

Keys are PEM files (PKCS#8 private key, mode 0600; SubjectPublicKeyInfo public key):
``lineguard-model keygen --out DIR`` makes a pair.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle, BundleError, load_bundle

__all__ = ["SignatureError", "check_version_change", "generate_keypair", "load_private_key", "load_public_keys",
           "rebadge_bundle", "sign_bundle", "verify_bundle"]


class SignatureError(BundleError):
    """A bundle that is unsigned, signed by an unknown key, or altered after signing."""


def generate_keypair(out_dir: Path, name: str = "lineguard-bundles") -> tuple[Path, Path]:
    """``(private, public)`` PEM paths; the private key file is created mode 0600, never overwritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if priv_path.exists():
        raise FileExistsError(f"{priv_path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    keys = []
    for p in paths:
        try:
            key = serialization.load_pem_public_key(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"{p}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{p}: not an Ed25519 public key")
        keys.append(key)
    if not keys:
        raise SignatureError("no public key to verify bundles with")
    return keys


def sign_bundle(bundle_dir: Path, key: Ed25519PrivateKey) -> Path:
    """Check the bundle's files against its manifest, then write ``manifest.sig``."""
    bundle_dir = Path(bundle_dir)
    load_bundle(bundle_dir, roles=(), verify=True)  # never sign files that do not match the manifest
    signature = key.sign((bundle_dir / MANIFEST_FILE).read_bytes())
    fd, tmp = tempfile.mkstemp(prefix=".manifest.sig.", dir=bundle_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(signature)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, bundle_dir / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle_dir / SIGNATURE_FILE


def rebadge_bundle(src: Path, out: Path, version: str, key: Path | None,
                   roles: Sequence[str] = ("onnx_int8",)) -> Path:
    """A bundle ``version`` (parent: ``src``'s version) at ``out`` with ``src``'s ``roles`` (its
    ONNX files' metadata rewritten to the new version, as a release writes them); signed with the
    private key file ``key`` (None: unsigned). For rollout drills and tests: the weights are ``src``'s.
    The split parts' description goes with them when ``roles`` holds the edge part."""
    import shutil

    from models.bundle import write_bundle
    from models.onnx_meta import read_metadata, write_metadata

    b = load_bundle(src, roles=tuple(roles))
    m = b.manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as stage:
        files = {}
        for role in roles:
            files[role] = Path(stage) / b.path(role).name
            shutil.copyfile(b.path(role), files[role])
            if files[role].suffix == ".onnx":
                write_metadata(files[role], {**read_metadata(files[role]), "bundle_version": version})
        write_bundle(out, name=m.name, version=version, parent_version=m.version, classes=m.classes,
                     input_size=m.input_size, files=files, preprocessing=m.preprocessing,
                     postprocessing=m.postprocessing, quantization=m.quantization,
                     split=m.split if "split_edge_int8" in roles else None)
    if key is not None:
        sign_bundle(out, load_private_key(key))
    return out


def verify_bundle(bundle_dir: Path, keys: Sequence[Ed25519PublicKey], roles: Iterable[str] = ("onnx_int8",)) -> Bundle:
    """The bundle, once its signature (by one of ``keys``) and every file's hash check out."""
    bundle_dir = Path(bundle_dir)
    sig_path = bundle_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        raise SignatureError(f"{bundle_dir}: unsigned ({SIGNATURE_FILE} missing)")
    signature = sig_path.read_bytes()
    if len(signature) != 64:
        raise SignatureError(f"{sig_path}: {len(signature)} bytes, an Ed25519 signature has 64")
    try:
        manifest = (bundle_dir / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{bundle_dir}: cannot read {MANIFEST_FILE} ({exc})") from None
    for key in keys:
        try:
            key.verify(signature, manifest)
            break
        except InvalidSignature:
            continue
    else:
        raise SignatureError(f"{bundle_dir}: the signature does not match the manifest with any of the "
                             f"{len(keys)} trusted key(s): altered after signing, or signed by another key")
    return load_bundle(bundle_dir, roles=roles, verify=True)  # every file's SHA-256 and size


_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def _key(version: str) -> tuple[int, int, int]:
    m = _VERSION.match(version)
    if m is None:
        raise SignatureError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def check_version_change(current: str | None, new: str, pinned: str | None = None) -> None:
    """Refuse ``new`` when it is older than ``current`` (or the same), unless ``pinned == new``."""
    if pinned is not None and pinned == new:
        return
    if current is not None and _key(new) <= _key(current):
        raise SignatureError(f"bundle {new} is not newer than the running {current}: a downgrade needs the "
                             f"version pinned by an admin")
