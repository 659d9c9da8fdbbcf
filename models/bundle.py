"""The model bundle: a directory holding ``manifest.json`` plus the files it lists.

A bundle is what the hub ships and an edge agent loads. The manifest pins every file by
SHA-256 and size, and records everything an agent needs to run the model the way it was
evaluated (classes, input size, pre/post-processing, quantization recipe).

This module imports only the standard library, pydantic and numpy (no torch, no onnx), so
edge agents can use it.

Layout::

    BUNDLE/
      manifest.json
      model_fp32.onnx       role onnx_fp32
      model_int8.onnx       role onnx_int8
      checkpoint.pt         role checkpoint (hub only; agents do not carry it)
      split_edge_int8.onnx  role split_edge_int8 (split inference: the agent's part, INT8)
      split_edge_fp32.onnx  role split_edge_fp32
      split_hub.onnx        role split_hub (the head service's part)
      split_bottleneck.pt   role split_bottleneck (the trained bottleneck and the hub layers it tuned:
                            the torch head on a GPU hub, and retraining)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.fsutil import atomic_write_json

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "ROLES",
    "SIGNATURE_FILE",
    "Bundle",
    "BundleError",
    "FileEntry",
    "Manifest",
    "Postprocessing",
    "Preprocessing",
    "load_bundle",
    "sha256_file",
    "write_bundle",
]

FORMAT_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
#: Detached Ed25519 signature of manifest.json's exact bytes (models/signing.py).
SIGNATURE_FILE = "manifest.sig"
ROLES = ("onnx_fp32", "onnx_int8", "checkpoint", "split_edge_fp32", "split_edge_int8", "split_hub",
         "split_bottleneck")
#: File name each role gets inside the bundle (the source file's suffix is kept).
DEFAULT_FILE_NAMES = {"onnx_fp32": "model_fp32", "onnx_int8": "model_int8", "checkpoint": "checkpoint",
                      "split_edge_fp32": "split_edge_fp32", "split_edge_int8": "split_edge_int8",
                      "split_hub": "split_hub", "split_bottleneck": "split_bottleneck"}
_CHUNK = 1 << 20  # 1 MiB

Role = Literal["onnx_fp32", "onnx_int8", "checkpoint", "split_edge_fp32", "split_edge_int8", "split_hub",
               "split_bottleneck"]


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read access (``manifest.postprocessing.get("operating_conf")``)."""
        return getattr(self, key, default) if key in type(self).model_fields else default


class Preprocessing(_Strict):
    letterbox: bool = True
    pad_value: int = 114
    color: Literal["RGB", "BGR"] = "RGB"
    scale: str = "1/255"
    layout: Literal["NCHW", "NHWC"] = "NCHW"


class Postprocessing(_Strict):
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.45, ge=0, le=1)
    max_det: int = Field(300, gt=0)
    #: The confidence the line actually alarms at (chosen on the validation set).
    operating_conf: float = Field(0.25, ge=0, le=1)


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError(f"file path must be relative and inside the bundle, got {v!r}")
        return v


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1)
    version: str = Field(pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.\-+]+)?$")
    parent_version: str | None = None
    created_at: str
    classes: list[str] = Field(min_length=1)
    input_size: tuple[int, int]  # (h, w)
    preprocessing: Preprocessing = Preprocessing()
    postprocessing: Postprocessing = Postprocessing()
    files: dict[Role, FileEntry]
    quantization: dict[str, Any] | None = None
    #: split inference (issue 5): {"cut", "spec" (models.feature_codec.FeatureSpec), "bottleneck", "metrics"}
    split: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, v: str) -> str:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"created_at must be ISO 8601, got {v!r}") from e
        offset = dt.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise ValueError(f"created_at must be UTC, got {v!r}")
        return v

    @field_validator("input_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0:
            raise ValueError(f"input_size must be positive [h, w], got {list(v)}")
        return v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate class names in {v}")
        return v


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=2)


def write_bundle(
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    classes: Iterable[str],
    input_size: tuple[int, int] | list[int],
    files: Mapping[str, str | Path],
    parent_version: str | None = None,
    preprocessing: Mapping[str, Any] | Preprocessing | None = None,
    postprocessing: Mapping[str, Any] | Postprocessing | None = None,
    quantization: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Assemble a bundle at ``out_dir`` and return its manifest.

    Files are copied into a temporary sibling directory, hashed, the manifest is validated and
    written there, and only then is the directory renamed to ``out_dir``: a failure at any point
    leaves no ``out_dir`` behind (and an existing one untouched unless ``overwrite``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists")
    unknown = set(files) - set(ROLES)
    if unknown:
        raise BundleError(f"unknown file role(s) {sorted(unknown)}; roles are {list(ROLES)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for role, src in files.items():
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"file for role {role!r} not found: {src}")
            rel = DEFAULT_FILE_NAMES[role] + src.suffix
            dst = tmp / rel
            shutil.copyfile(src, dst)
            entries[role] = {"path": rel, "sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        fields: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "parent_version": parent_version,
            "created_at": created_at or _utc_now(),
            "classes": list(classes),
            "input_size": tuple(input_size),
            "files": entries,
            "quantization": dict(quantization) if quantization is not None else None,
            "metrics": dict(metrics or {}),
            "training": dict(training or {}),
            "split": dict(split) if split is not None else None,
        }
        if preprocessing is not None:
            fields["preprocessing"] = preprocessing
        if postprocessing is not None:
            fields["postprocessing"] = postprocessing
        try:
            manifest = Manifest.model_validate(fields)
        except ValidationError as e:
            raise BundleError(f"invalid manifest for {out_dir}: {_describe(e)}") from e
        _write_json_atomic(tmp / MANIFEST_FILE, manifest.model_dump(mode="json"))
        os.chmod(tmp / MANIFEST_FILE, 0o644)  # mkstemp/mkdtemp create 0600/0700
        os.chmod(tmp, 0o755)
        if out_dir.exists():  # overwrite: move the old one aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "b")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Bundle:
    """A loaded (and by default verified) bundle."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.dir = directory
        self.manifest = manifest

    def path(self, role: str) -> Path:
        entry = self.manifest.files.get(role)  # type: ignore[call-overload]
        if entry is None:
            raise BundleError(f"bundle {self.dir} has no file with role {role!r}")
        return self.dir / entry.path

    def has(self, role: str) -> bool:
        return role in self.manifest.files and self.path(role).is_file()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.dir)!r}, {m.name} {m.version}, roles={sorted(m.files)})"


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{path}: {MANIFEST_FILE} not found") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: {MANIFEST_FILE} is not valid JSON ({e})") from e
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise BundleError(f"{path}: malformed {MANIFEST_FILE}: {_describe(e)}") from e


def load_bundle(directory: str | Path, roles: Iterable[str] = ("onnx_int8",), verify: bool = True) -> Bundle:
    """Load the bundle at ``directory``.

    Every role in ``roles`` must be listed and present. With ``verify``, the SHA-256 and size of
    every listed file that is present are checked, requested or not. A listed file that is absent
    is an error only when its role is requested: a machine keeps what it runs (the hub no edge parts;
    an agent neither the checkpoint nor the hub part, and one updated over the air only its
    mode's files: the INT8 model, or in split mode only the edge part).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} not found")
    manifest = read_manifest(directory)
    bundle = Bundle(directory, manifest)
    roles = tuple(roles)
    for role in roles:
        if role not in ROLES:
            raise BundleError(f"unknown role {role!r}; roles are {list(ROLES)}")
        if role not in manifest.files:
            raise BundleError(f"{directory / MANIFEST_FILE}: no file listed for requested role {role!r}")
    for role, entry in manifest.files.items():
        path = directory / entry.path
        if not path.is_file():
            if role in roles:
                raise BundleError(
                    f"{path}: missing (role {role!r}, expected sha256 {entry.sha256}, actual: no file)"
                )
            continue
        if not verify:
            continue
        actual = sha256_file(path)
        size = path.stat().st_size
        if actual != entry.sha256 or size != entry.bytes:
            raise BundleError(
                f"{path}: hash mismatch (role {role!r}): expected sha256 {entry.sha256} "
                f"({entry.bytes} bytes), actual {actual} ({size} bytes)"
            )
    return bundle
