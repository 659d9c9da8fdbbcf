"""models.bundle: writing, loading, verification and atomicity (no torch/onnx needed)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import bundle as B
from models.bundle import MANIFEST_FILE, BundleError, load_bundle, write_bundle

CLASSES = ["scratch", "crack", "dent", "stain"]


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for role, payload in {
        "onnx_fp32": b"fp32-model" * 100,
        "onnx_int8": b"int8-model" * 50,
        "checkpoint": b"pt" * 10,
    }.items():
        suffix = ".pt" if role == "checkpoint" else ".onnx"
        p = src / f"{role}{suffix}"
        p.write_bytes(payload)
        files[role] = p
    return files


def _write(out: Path, sources: dict[str, Path], **overrides) -> B.Manifest:
    kwargs = dict(
        name="lineguard-detector",
        version="1.2.0",
        parent_version="1.1.0",
        classes=CLASSES,
        input_size=(640, 640),
        files=sources,
        quantization={"method": "static", "format": "QDQ", "excluded_nodes": ["/model.22/Sigmoid"]},
        metrics={"mAP50": 0.5},
    )
    kwargs.update(overrides)
    return write_bundle(out, **kwargs)


@pytest.fixture()
def bundle_dir(tmp_path: Path, sources: dict[str, Path]) -> Path:
    out = tmp_path / "bundle"
    _write(out, sources)
    return out


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_FILE).read_text())


def _rewrite(d: Path, data: dict) -> None:
    (d / MANIFEST_FILE).write_text(json.dumps(data))


def test_write_then_load_roundtrip(bundle_dir: Path, sources: dict[str, Path]) -> None:
    b = load_bundle(bundle_dir, roles=("onnx_int8", "onnx_fp32", "checkpoint"))
    m = b.manifest
    assert (m.format_version, m.name) == (1, "lineguard-detector")
    assert (m.version, m.parent_version) == ("1.2.0", "1.1.0")
    assert m.classes == CLASSES and m.input_size == (640, 640)
    assert m.preprocessing.pad_value == 114 and m.preprocessing.color == "RGB"
    assert m.created_at.endswith("Z")
    for role, src in sources.items():
        assert b.path(role).read_bytes() == src.read_bytes()
        assert m.files[role].sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        assert m.files[role].bytes == src.stat().st_size
    assert b.path("onnx_int8").name == "model_int8.onnx"
    # no temp leftovers next to the bundle
    assert [p.name for p in bundle_dir.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("role", ["onnx_fp32", "onnx_int8", "checkpoint"])
def test_tampered_file_names_file_and_hashes(bundle_dir: Path, role: str) -> None:
    entry = _manifest(bundle_dir)["files"][role]
    target = bundle_dir / entry["path"]
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(BundleError) as ei:
        load_bundle(bundle_dir)  # default roles: only onnx_int8 requested, all present files verified
    msg = str(ei.value)
    assert entry["path"] in msg and entry["sha256"] in msg and actual in msg


def test_verify_false_skips_hashing(bundle_dir: Path) -> None:
    (bundle_dir / "model_int8.onnx").write_bytes(b"x")
    assert load_bundle(bundle_dir, verify=False).path("onnx_int8").read_bytes() == b"x"


def test_missing_checkpoint_allowed_unless_requested(bundle_dir: Path) -> None:
    (bundle_dir / "checkpoint.pt").unlink()
    b = load_bundle(bundle_dir, roles=("onnx_int8",))
    assert not b.has("checkpoint") and b.has("onnx_int8")
    with pytest.raises(BundleError, match="checkpoint.pt"):
        load_bundle(bundle_dir, roles=("checkpoint",))


@pytest.mark.parametrize("role,name", [("onnx_int8", "model_int8.onnx"), ("onnx_fp32", "model_fp32.onnx")])
def test_missing_model_file_is_an_error_when_requested(bundle_dir: Path, role: str, name: str) -> None:
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=name):
        load_bundle(bundle_dir, roles=(role,))


def test_an_agent_may_carry_only_the_int8_model(bundle_dir: Path) -> None:
    (bundle_dir / "model_fp32.onnx").unlink()  # what an over-the-air update fetches: the INT8 model only
    b = load_bundle(bundle_dir, roles=("onnx_int8",))
    assert b.has("onnx_int8") and not b.has("onnx_fp32")


def test_a_split_agent_may_carry_only_the_edge_part(bundle_dir: Path, sources: dict[str, Path]) -> None:
    """What a split agent's update fetches: the edge part, not the full model (which it never runs)."""
    out = bundle_dir.parent / "split"
    _write(out, sources, files={"onnx_int8": sources["onnx_int8"], "split_edge_int8": sources["onnx_int8"]})
    (out / "model_int8.onnx").unlink()
    assert load_bundle(out, roles=("split_edge_int8",)).has("split_edge_int8")
    with pytest.raises(BundleError, match="model_int8.onnx"):
        load_bundle(out, roles=("onnx_int8",))


def test_requested_role_not_listed(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "b"
    _write(out, sources, files={"onnx_int8": sources["onnx_int8"]})
    with pytest.raises(BundleError, match="onnx_fp32"):
        load_bundle(out, roles=("onnx_fp32",))


def _drop(key):
    def f(d: dict) -> None:
        del d[key]

    return f


def _set(path: tuple, value):
    def f(d: dict) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return f


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (_drop("classes"), "classes"),
        (_drop("input_size"), "input_size"),
        (_drop("files"), "files"),
        (_drop("version"), "version"),
        (_set(("surprise",), 1), "surprise"),
        (_set(("postprocessing", "nms_agnostic"), True), "nms_agnostic"),
        (_set(("files", "onnx_int8", "sha256"), "abc"), "sha256"),
        (_set(("files", "onnx_int8", "path"), "../escape.onnx"), "path"),
        (_set(("files", "tflite"), {"path": "m.tflite", "sha256": "0" * 64, "bytes": 1}), "tflite"),
        (_set(("format_version",), 2), "format_version"),
        (_set(("created_at",), "2024-01-01T00:00:00+02:00"), "created_at"),
        (_set(("input_size",), [640]), "input_size"),
    ],
    ids=[
        "no-classes", "no-input_size", "no-files", "no-version", "extra-top-key", "extra-nested-key",
        "bad-sha", "path-escape", "unknown-role", "format-v2", "non-utc", "bad-input-size",
    ],
)  # fmt: skip
def test_malformed_manifest_names_key(bundle_dir: Path, mutate, expected: str) -> None:
    data = _manifest(bundle_dir)
    mutate(data)
    _rewrite(bundle_dir, data)
    with pytest.raises(BundleError) as ei:
        load_bundle(bundle_dir)
    assert MANIFEST_FILE in str(ei.value) and expected in str(ei.value)


@pytest.mark.parametrize("text", ["", "{not json", "[]"])
def test_unparseable_manifest(bundle_dir: Path, text: str) -> None:
    (bundle_dir / MANIFEST_FILE).write_text(text)
    with pytest.raises(BundleError, match=MANIFEST_FILE):
        load_bundle(bundle_dir)


def test_no_manifest_or_no_dir(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match=MANIFEST_FILE):
        load_bundle(tmp_path)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_leaves_nothing(tmp_path: Path, sources, monkeypatch) -> None:
    calls = {"n": 0}
    real = B.sha256_file

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk on fire")
        return real(path)

    monkeypatch.setattr(B, "sha256_file", flaky)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(OSError, match="disk on fire"):
        _write(out, sources)
    assert calls["n"] == 2
    assert not out.exists()
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"version": "latest"}, "version"),
        ({"classes": []}, "classes"),
        ({"classes": ["a", "a"]}, "duplicate"),
        ({"input_size": (0, 640)}, "input_size"),
        ({"files": {"onnx_int9": Path("x")}}, "onnx_int9"),
    ],
)
def test_invalid_fields_rejected_before_anything_lands(tmp_path, sources, overrides, match) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match=match):
        _write(out, sources, **overrides)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_missing_source_file(tmp_path: Path, sources) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="nothere.onnx"):
        _write(out, sources, files={**sources, "onnx_int8": tmp_path / "nothere.onnx"})
    assert not out.exists()


def test_existing_out_dir_needs_overwrite(bundle_dir: Path, sources) -> None:
    before = _manifest(bundle_dir)
    with pytest.raises(BundleError, match="exists"):
        _write(bundle_dir, sources, version="2.0.0")
    assert _manifest(bundle_dir) == before
    m = _write(bundle_dir, sources, version="2.0.0", overwrite=True)
    assert m.version == "2.0.0" and load_bundle(bundle_dir).manifest.version == "2.0.0"
    assert _leftovers(bundle_dir.parent) == []


def test_hash_is_chunked_and_correct(tmp_path: Path) -> None:
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * (5 * 4096 + 7)  # > 1 MiB, not a multiple of the chunk
    p.write_bytes(data)
    assert B.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_signature_not_faked(bundle_dir: Path) -> None:
    assert B.SIGNATURE_FILE == "manifest.sig"
    assert not (bundle_dir / B.SIGNATURE_FILE).exists()


def test_imports_without_heavy_deps() -> None:
    code = (
        "import sys, models.bundle; "
        "bad = [m for m in ('torch', 'ultralytics', 'onnx', 'onnxruntime') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
