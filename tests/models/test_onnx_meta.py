"""models.onnx_meta: embedded LineGuard metadata round-trip and manifest cross-checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from models.onnx_meta import (  # noqa: E402
    PREFIX,
    OnnxMetadataError,
    check_against_manifest,
    metadata_from_manifest_fields,
    read_metadata,
    write_metadata,
)

CLASSES = ["scratch", "crack", "dent", "stain"]
PRE = {"letterbox": True, "pad_value": 114, "color": "RGB", "scale": "1/255", "layout": "NCHW"}


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    """A tiny ``images (N,3,32,32) -> Relu -> out`` model carrying one foreign prop."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["out"], name="relu")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = model.metadata_props.add()
    p.key, p.value = "names", "{0: 'scratch'}"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _meta(**kw) -> dict[str, str]:
    args = dict(
        classes=CLASSES, input_size=(32, 32), preprocessing=PRE, quantization=None, bundle_version="1.0.0"
    )
    args.update(kw)
    return metadata_from_manifest_fields(**args)


def _manifest(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"classes": CLASSES, "input_size": (32, 32), "version": "1.0.0", **kw})


@pytest.mark.parametrize("quant", [None, {"method": "static", "excluded_nodes": ["/model.22/Sigmoid"]}])
def test_roundtrip(model_path: Path, quant) -> None:
    write_metadata(model_path, _meta(quantization=quant))
    meta = read_metadata(model_path)
    assert set(meta) == {"classes", "input_size", "preprocessing", "quantization", "bundle_version"}
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["input_size"]) == [32, 32]
    assert json.loads(meta["preprocessing"]) == PRE
    assert meta["quantization"] == "none" if quant is None else json.loads(meta["quantization"]) == quant
    assert meta["bundle_version"] == "1.0.0"
    # foreign props kept, ours prefixed
    everything = read_metadata(model_path, all_keys=True)
    assert everything["names"] == "{0: 'scratch'}" and f"{PREFIX}classes" in everything


def test_rewrite_replaces_not_duplicates(model_path: Path) -> None:
    write_metadata(model_path, _meta(bundle_version="1.0.0"))
    write_metadata(model_path, {"lineguard.bundle_version": "1.0.1"})
    keys = [p.key for p in onnx.load(model_path).metadata_props]
    assert keys.count(f"{PREFIX}bundle_version") == 1
    assert read_metadata(model_path)["bundle_version"] == "1.0.1"
    assert json.loads(read_metadata(model_path)["classes"]) == CLASSES  # untouched keys kept


def test_writing_the_values_it_has_leaves_the_file_as_it_is(model_path: Path) -> None:
    import hashlib

    write_metadata(model_path, _meta(bundle_version="1.0.0"))
    before = hashlib.sha256(model_path.read_bytes()).hexdigest(), model_path.stat().st_mtime_ns
    write_metadata(model_path, {"bundle_version": "1.0.0"})  # the split step, the same version again
    assert (hashlib.sha256(model_path.read_bytes()).hexdigest(), model_path.stat().st_mtime_ns) == before
    write_metadata(model_path, {"bundle_version": "1.0.1"})
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() != before[0]


def test_write_keeps_model_runnable_and_leaves_no_temp(model_path: Path) -> None:
    import onnxruntime as ort

    write_metadata(model_path, _meta())
    assert [p.name for p in model_path.parent.iterdir()] == [model_path.name]
    x = -np.ones((2, 3, 32, 32), np.float32)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": x})[0]
    assert out.shape == (2, 3, 32, 32) and float(out.max()) == 0.0


def test_non_string_value_rejected(model_path: Path) -> None:
    with pytest.raises(TypeError, match="classes"):
        write_metadata(model_path, {"classes": CLASSES})  # type: ignore[dict-item]


def test_check_against_manifest_ok(model_path: Path) -> None:
    write_metadata(model_path, _meta())
    check_against_manifest(model_path, _manifest())  # no exception


@pytest.mark.parametrize(
    "manifest_kw,key",
    [
        ({"classes": ["scratch", "crack", "dent"]}, "classes"),
        ({"classes": ["crack", "scratch", "dent", "stain"]}, "classes"),
        ({"input_size": (64, 64)}, "input_size"),
        ({"version": "2.0.0"}, "bundle_version"),
    ],
)
def test_check_against_manifest_names_mismatching_key(model_path: Path, manifest_kw, key: str) -> None:
    write_metadata(model_path, _meta())
    with pytest.raises(OnnxMetadataError) as ei:
        check_against_manifest(model_path, _manifest(**manifest_kw))
    assert f"{PREFIX}{key}" in str(ei.value) and model_path.name in str(ei.value)


def test_input_tensor_size_checked_even_if_metadata_agrees(model_path: Path) -> None:
    write_metadata(model_path, _meta(input_size=(64, 64)))  # lying metadata, tensor is 32x32
    with pytest.raises(OnnxMetadataError, match="input tensor"):
        check_against_manifest(model_path, _manifest(input_size=(64, 64)))


def test_missing_metadata_key(model_path: Path) -> None:
    with pytest.raises(OnnxMetadataError, match=f"{PREFIX}classes missing"):
        check_against_manifest(model_path, _manifest())


@pytest.mark.parametrize("fn", [read_metadata, lambda p: check_against_manifest(p, _manifest())])
def test_truncated_onnx_names_file(model_path: Path, fn) -> None:
    write_metadata(model_path, _meta())
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxMetadataError) as ei:
        fn(model_path)
    assert str(model_path) in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxMetadataError, match="not found"):
        read_metadata(tmp_path / "absent.onnx")
