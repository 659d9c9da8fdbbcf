"""Split parts for a retrained model: production's bottleneck with the candidate's hub layers,
only when the candidate's layers up to the cut are production's (else a clear refusal)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.bundle import load_bundle, write_bundle  # noqa: E402
from models.onnx_meta import read_metadata, write_metadata  # noqa: E402
from models.split_rebuild import SplitRebuildError, rebuild_split_parts  # noqa: E402

pytestmark = pytest.mark.slow

PRODUCTION = Path(__file__).resolve().parents[2] / "models" / "default"


def _candidate(tmp: Path, layer: int) -> Path:
    """An unsplit candidate 1.3.0 (parent 1.2.0) whose checkpoint differs from production's in
    ``layer`` (a bias nudged), as the release step leaves it."""
    from ultralytics import YOLO

    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp / "yolo_cfg"))
    prod = load_bundle(PRODUCTION, roles=("onnx_fp32", "onnx_int8", "checkpoint"))
    yolo = YOLO(str(prod.path("checkpoint")), task="detect")
    target = yolo.model.model[layer]
    bn = next(m for m in target.modules() if m.__class__.__name__ == "BatchNorm2d")
    bn.bias.data += 0.25
    ckpt = tmp / "ckpt.pt"
    yolo.save(str(ckpt))
    m = prod.manifest
    onnx = {}
    for role in ("onnx_fp32", "onnx_int8"):  # the release writes every key, its version among them
        onnx[role] = tmp / f"{role}.onnx"
        shutil.copyfile(prod.path(role), onnx[role])
        write_metadata(onnx[role], {**read_metadata(onnx[role]), "bundle_version": "1.3.0"})
    write_bundle(tmp / "1.3.0", name=m.name, version="1.3.0", parent_version="1.2.0", classes=m.classes,
                 input_size=m.input_size, files={**onnx, "checkpoint": ckpt},
                 preprocessing=m.preprocessing, postprocessing=m.postprocessing, quantization=m.quantization)
    return tmp / "1.3.0"


def _calib(tmp: Path) -> Path:
    import cv2

    root = tmp / "calib"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        for i in range(3):
            img = np.random.default_rng(i).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: scratch}\n")
    return root


def test_device_layers_changed_refused(tmp_path: Path) -> None:
    cand = _candidate(tmp_path, layer=2)
    before = (cand / "manifest.json").read_bytes()
    with pytest.raises(SplitRebuildError, match=r"layers 0\.\.4 changed.*model\.2\."):
        rebuild_split_parts(PRODUCTION, cand, calib_data=_calib(tmp_path), work=tmp_path / "w")
    assert (cand / "manifest.json").read_bytes() == before  # untouched


def test_rebuilt_parts_carry_the_retrained_head(tmp_path: Path) -> None:
    cand = _candidate(tmp_path, layer=15)
    released = load_bundle(cand, roles=()).manifest.files
    m = rebuild_split_parts(PRODUCTION, cand, calib_data=_calib(tmp_path), work=tmp_path / "w")
    assert m.version == "1.3.0" and m.parent_version == "1.2.0"
    # the whole models keep their bytes: what the gate scored (and cached by SHA-256) is what ships
    assert [m.files[r].sha256 for r in ("onnx_fp32", "onnx_int8")] == [released[r].sha256
                                                                      for r in ("onnx_fp32", "onnx_int8")]
    assert m.split and m.split["cut"] == 4 and m.split["metrics"] == {
        "bottleneck_from": "1.2.0", "hub_tuning": "production's tuning added to the retrained layers"}
    b = load_bundle(cand, roles=("split_edge_fp32", "split_edge_int8", "split_hub", "split_bottleneck"))
    for role in ("split_edge_int8", "split_hub"):
        meta = json.loads(read_metadata(b.path(role))["split"])  # type: ignore[index]
        assert meta["role"] == role
        assert read_metadata(b.path(role))["bundle_version"] == "1.3.0"
    import torch

    raw = torch.load(b.path("split_bottleneck"), map_location="cpu", weights_only=True)
    # not production's tuned hub layers as they are (they would overwrite the retrained ones), but
    # the candidate's own plus what production's tuning changed in production's
    from ultralytics import YOLO

    from models.split_rebuild import _hub_state

    prod_raw = torch.load(load_bundle(PRODUCTION, roles=("split_bottleneck",)).path("split_bottleneck"),
                          map_location="cpu", weights_only=True)
    own = _hub_state(YOLO(str(tmp_path / "ckpt.pt"), task="detect").model, 4)
    trained = _hub_state(YOLO(str(load_bundle(PRODUCTION, roles=("checkpoint",)).path("checkpoint")),
                              task="detect").model, 4)
    assert raw["hub_layers"].keys() == own.keys()
    moved = [k for k, v in own.items() if v.is_floating_point()
             and not torch.equal(prod_raw["hub_layers"][k].float(), trained[k].float())]
    assert moved  # production's tuning changed some of its layers ...
    for k in moved:  # ... and that change is on the candidate's (stored in FP16)
        expected = own[k].float() + prod_raw["hub_layers"][k].float() - trained[k].float()
        assert torch.allclose(raw["hub_layers"][k].float(), expected, rtol=1e-3, atol=1e-3), k
    nudged = "10.cv1.bn.bias"  # the candidate's layer 15 (hub layer 10)
    assert not torch.equal(raw["hub_layers"][nudged].float(), prod_raw["hub_layers"][nudged].float())
    # the hub part runs the candidate's layer 15: its output differs from production's hub part
    import onnxruntime as ort

    codes = np.random.default_rng(0).integers(0, 16, (1, 4, 68, 120)).astype(np.uint8)
    outs = []
    for path in (b.path("split_hub"), load_bundle(PRODUCTION, roles=("split_hub",)).path("split_hub")):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {s.get_inputs()[0].name: codes})[0])
    assert outs[0].shape == outs[1].shape and not np.allclose(outs[0], outs[1])


def test_device_layers_changed_bottleneck_fine_tuned(tmp_path: Path) -> None:
    import torch

    cand = _candidate(tmp_path, layer=2)
    m = rebuild_split_parts(PRODUCTION, cand, calib_data=_calib(tmp_path), work=tmp_path / "w", retune_steps=2,
                            device="cpu")
    assert m.split is not None
    retuned = m.split["metrics"]["bottleneck_retuned"]
    assert retuned["steps"] == 2 and retuned["images"] == 3 and retuned["device"] == "cpu"
    assert m.split["metrics"]["bottleneck_from"] == "1.2.0"
    b = load_bundle(cand, roles=("split_edge_int8", "split_hub", "split_bottleneck"))
    new = torch.load(b.path("split_bottleneck"), map_location="cpu", weights_only=True)
    old = torch.load(load_bundle(PRODUCTION, roles=("split_bottleneck",)).path("split_bottleneck"),
                     map_location="cpu", weights_only=True)
    assert new["info"]["retuned_from"] == "1.2.0"
    # the candidate's hub layers were tuned with the bottleneck, as production's were (tune_hub 0.1)
    assert m.split["metrics"]["hub_tuning"] == ("redone with the bottleneck (lr x 0.1), from the retrained layers "
                                                "plus production's tuning")
    assert new["hub_layers"] is not None and new["info"]["tune_hub"] == 0.1
    assert new["state_dict"].keys() == old["state_dict"].keys()
    assert any(not torch.equal(new["state_dict"][k], old["state_dict"][k]) for k in old["state_dict"]
               if old["state_dict"][k].is_floating_point())  # trained from production's weights, not kept


def test_transferred_tuning_only_where_the_shapes_agree() -> None:
    """A head grown for a new class keeps its own rows; a tensor production's tuning lacks stays too."""
    import torch
    from ultralytics import YOLO

    from models.split_rebuild import _hub_state, transferred_hub_tuning

    model = YOLO(str(load_bundle(PRODUCTION, roles=("checkpoint",)).path("checkpoint")), task="detect").model
    own = _hub_state(model, 4)
    floats = [k for k, v in own.items() if v.is_floating_point()]
    grown, missing, shifted = floats[-1], floats[-2], floats[0]
    tuned = {k: v.float() + 1 for k, v in own.items() if v.is_floating_point() and k != missing}
    tuned[grown] = torch.zeros(own[grown].shape[0] + 1, *own[grown].shape[1:])
    out = transferred_hub_tuning(model, model, tuned, 4)
    assert out.keys() == own.keys()
    assert torch.allclose(out[shifted], own[shifted].float() + 1)
    assert torch.equal(out[grown], own[grown]) and torch.equal(out[missing], own[missing])
    ints = [k for k, v in own.items() if not v.is_floating_point()]
    assert ints and all(torch.equal(out[k], own[k]) for k in ints)  # batch norm's counters as they were


def test_a_prepared_bottleneck_is_reused_for_its_checkpoint_only(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import models.split_rebuild as sr

    cand = _candidate(tmp_path, layer=15)
    ckpt = tmp_path / "ckpt.pt"
    work = tmp_path / "w"
    metrics = sr.prepare_bottleneck(PRODUCTION, ckpt, calib_data=_calib(tmp_path), work=work)
    assert metrics == {"bottleneck_from": "1.2.0", "hub_tuning": "production's tuning added to the retrained layers"}
    assert sr.prepared_bottleneck(work, ckpt) == metrics
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"\0")
    assert sr.prepared_bottleneck(work, other) is None  # prepared for another checkpoint
    doc = json.loads((work / "bottleneck.json").read_text())

    def not_again(*a: object, **k: object) -> None:
        raise AssertionError("prepare_bottleneck called although one was prepared")

    monkeypatch.setattr(sr, "prepare_bottleneck", not_again)
    m = sr.rebuild_split_parts(PRODUCTION, cand, calib_data=tmp_path / "calib", work=work, checkpoint=ckpt)
    assert m.split and m.split["metrics"] == doc["metrics"]
    (work / "bottleneck.json").write_text("{not json")
    assert sr.prepared_bottleneck(work, ckpt) is None


def test_prepared_in_a_spawned_process(tmp_path: Path) -> None:
    from models.split_rebuild import prepared_bottleneck, start_prepare_bottleneck

    _candidate(tmp_path, layer=2)
    ckpt = tmp_path / "ckpt.pt"
    prep = start_prepare_bottleneck(PRODUCTION, ckpt, calib_data=_calib(tmp_path), work=tmp_path / "w",
                                    retune_steps=2, device="cpu")
    assert prep is not None
    prep.join(300)
    assert prep.exitcode == 0
    metrics = prepared_bottleneck(tmp_path / "w", ckpt)
    assert metrics is not None and metrics["bottleneck_retuned"]["steps"] == 2
    (tmp_path / "u").mkdir()
    unsplit = _candidate(tmp_path / "u", layer=15)  # a bundle without split parts: nothing to prepare
    assert start_prepare_bottleneck(unsplit, ckpt, calib_data=tmp_path / "calib", work=tmp_path / "w2") is None


def test_started_before_the_checkpoint_exists(tmp_path: Path) -> None:
    """The retraining job starts the process with training: it loads while the checkpoint is made,
    then works on the one it is handed; cancelled (training failed), it exits without work."""
    from models.split_rebuild import prepared_bottleneck, start_prepare_bottleneck

    calib = _calib(tmp_path)
    prep = start_prepare_bottleneck(PRODUCTION, None, calib_data=calib, work=tmp_path / "w", retune_steps=2,
                                    device="cpu")
    assert prep is not None
    _candidate(tmp_path, layer=2)  # "training" ends after the process started
    ckpt = tmp_path / "ckpt.pt"
    prep.submit(ckpt)
    prep.join(300)
    assert prep.exitcode == 0
    assert prepared_bottleneck(tmp_path / "w", ckpt) is not None
    idle = start_prepare_bottleneck(PRODUCTION, None, calib_data=calib, work=tmp_path / "w2", retune_steps=2,
                                    device="cpu")
    assert idle is not None
    idle.cancel()
    assert idle.exitcode == 0 and not (tmp_path / "w2" / "bottleneck.json").exists()


def test_a_dead_process_does_not_fail_the_caller(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process that died while loading (here: no frames) refuses nothing: ``submit`` says False and
    logs it, and the split step prepares the bottleneck itself."""
    from models.split_rebuild import start_prepare_bottleneck

    prep = start_prepare_bottleneck(PRODUCTION, None, calib_data=tmp_path / "missing", work=tmp_path / "w",
                                    retune_steps=2, device="cpu")
    assert prep is not None
    prep.join(300)
    assert prep.exitcode not in (0, None)
    with caplog.at_level("WARNING", logger="models.split_rebuild"):
        assert prep.submit(tmp_path / "ckpt.pt") is False
    assert "the split step will prepare the bottleneck itself" in caplog.text
    prep.cancel()  # nothing left to stop: no error either
