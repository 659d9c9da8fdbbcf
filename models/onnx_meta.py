"""LineGuard metadata embedded in an ONNX file's ``metadata_props``.

The bundle manifest is the authority; the embedded copy lets an agent (or a human with
Netron) catch an ONNX file that was swapped in from another bundle. Keys are prefixed
``lineguard.``: ``classes`` (JSON list), ``input_size`` (JSON ``[h, w]``), ``preprocessing``
(JSON), ``quantization`` (JSON or ``"none"``) and ``bundle_version``.

Reading goes through onnxruntime (``get_modelmeta().custom_metadata_map``) so that agents do
not need the ``onnx`` package; only :func:`write_metadata` imports ``onnx`` (lazily).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "META_KEYS",
    "PREFIX",
    "OnnxMetadataError",
    "check_against_manifest",
    "metadata_from_manifest_fields",
    "read_metadata",
    "write_metadata",
]

PREFIX = "lineguard."
META_KEYS = ("classes", "input_size", "preprocessing", "quantization", "bundle_version")


class OnnxMetadataError(ValueError):
    """An ONNX file is unreadable, lacks LineGuard metadata, or disagrees with its manifest."""


def metadata_from_manifest_fields(
    classes: list[str] | tuple[str, ...],
    input_size: tuple[int, int] | list[int],
    preprocessing: Mapping[str, Any],
    quantization: Mapping[str, Any] | None,
    bundle_version: str,
) -> dict[str, str]:
    """The string values :func:`write_metadata` expects, encoded the canonical way."""
    return {
        "classes": json.dumps(list(classes)),
        "input_size": json.dumps([int(v) for v in input_size]),
        "preprocessing": json.dumps(dict(preprocessing), sort_keys=True),
        "quantization": json.dumps(dict(quantization), sort_keys=True) if quantization else "none",
        "bundle_version": str(bundle_version),
    }


def write_metadata(onnx_path: str | Path, meta: Mapping[str, str]) -> None:
    """Set ``lineguard.<key>`` props on the model at ``onnx_path`` (atomically: temp + replace).

    Keys may be given with or without the prefix. Existing ``lineguard.*`` props are replaced;
    other props (e.g. Ultralytics' ``names``/``stride``) are kept. A model that already has these
    values is not written again.
    """
    import onnx

    onnx_path = Path(onnx_path)
    values = {}
    for k, v in meta.items():
        if not isinstance(v, str):
            raise TypeError(f"metadata value for {k!r} must be str, got {type(v).__name__}")
        values[k if k.startswith(PREFIX) else PREFIX + k] = v
    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:
        raise OnnxMetadataError(f"{onnx_path}: cannot load ONNX model ({e})") from e
    if all(any(p.key == k and p.value == v for p in model.metadata_props) for k, v in values.items()):
        return  # already so: the file keeps its bytes (its SHA-256, a detection cache's key, holds)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *sorted(values.items())]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    fd, tmp = tempfile.mkstemp(prefix=f".{onnx_path.name}.", suffix=".tmp", dir=onnx_path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, onnx_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(onnx_path: str | Path, all_keys: bool = False) -> dict[str, str]:
    """The ``lineguard.*`` props of ``onnx_path`` with the prefix stripped (all props if ``all_keys``)."""
    return _read(_session(Path(onnx_path)), all_keys)


def _session(onnx_path: Path) -> Any:
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise OnnxMetadataError(f"{onnx_path}: file not found")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxMetadataError(f"{onnx_path}: onnxruntime cannot load it ({e})") from e


def _read(sess: Any, all_keys: bool = False) -> dict[str, str]:
    props = dict(sess.get_modelmeta().custom_metadata_map)
    if all_keys:
        return props
    return {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}


def _decode(onnx_path: Path, meta: dict[str, str], key: str) -> Any:
    if key not in meta:
        raise OnnxMetadataError(f"{onnx_path}: metadata key {PREFIX}{key} missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise OnnxMetadataError(f"{onnx_path}: metadata key {PREFIX}{key} is not JSON ({e})") from e


def check_against_manifest(onnx_path: str | Path, manifest: Any) -> None:
    """Raise :class:`OnnxMetadataError` naming the key where the ONNX file and manifest disagree.

    Checks ``classes`` and ``input_size`` (and ``bundle_version`` when present in both), and
    that the model's input tensor has the manifest's spatial size if it is static.
    """
    onnx_path = Path(onnx_path)
    sess = _session(onnx_path)
    meta = _read(sess)
    classes = _decode(onnx_path, meta, "classes")
    if list(classes) != list(manifest.classes):
        raise OnnxMetadataError(
            f"{onnx_path}: metadata key {PREFIX}classes = {classes} does not match "
            f"manifest classes = {list(manifest.classes)}"
        )
    size = _decode(onnx_path, meta, "input_size")
    if list(size) != list(manifest.input_size):
        raise OnnxMetadataError(
            f"{onnx_path}: metadata key {PREFIX}input_size = {size} does not match "
            f"manifest input_size = {list(manifest.input_size)}"
        )
    version = getattr(manifest, "version", None)
    if "bundle_version" in meta and version and meta["bundle_version"] != version:
        raise OnnxMetadataError(
            f"{onnx_path}: metadata key {PREFIX}bundle_version = {meta['bundle_version']!r} "
            f"does not match manifest version = {version!r}"
        )
    shape = sess.get_inputs()[0].shape
    hw = shape[2:4] if len(shape) == 4 else []
    if all(isinstance(v, int) for v in hw) and hw and list(hw) != list(manifest.input_size):
        raise OnnxMetadataError(
            f"{onnx_path}: model input tensor is {list(hw)} (h, w) but manifest input_size = "
            f"{list(manifest.input_size)}"
        )
