"""Our evaluator against Ultralytics' own validator: same weights, same images, same input size.

The default bundle's checkpoint is exported to a square 960 ONNX model (Ultralytics' validator
letterboxes to a square when ``rect=False``) and scored by ``models.evaluate``; Ultralytics
scores the checkpoint itself. mAP50 and mAP50-95 must agree within 0.5 points.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.dataset_io import load_dataset
from models.evaluate import OnnxPredictor, evaluate
from models.synth import DatasetPreset, generate_dataset

pytest.importorskip("ultralytics")

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "models" / "default" / "checkpoint.pt"
IMGSZ = 960
TOLERANCE = 0.005  # 0.5 points


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    from models.export import export_onnx_fp32
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    root = tmp_path_factory.mktemp("crosscheck")
    preset = DatasetPreset(name="crosscheck", train=1, val=160, test=1)
    data = generate_dataset(root / "data", seed=11, preset=preset, workers=2, progress=False)
    onnx = export_onnx_fp32(CHECKPOINT, root / "square.onnx", IMGSZ)

    ours = evaluate(OnnxPredictor(onnx, multi_label=True), load_dataset(data), split="val", progress=False)
    theirs = YOLO(str(CHECKPOINT)).val(
        data=str(data / "data.yaml"), split="val", imgsz=IMGSZ, rect=False, batch=8, conf=0.001, iou=0.7,
        device="cpu", plots=False, verbose=False, project=str(root / "val"),
    )
    result = {"ours_map50": ours.map50, "ours_map50_95": ours.map50_95,
              "theirs_map50": float(theirs.box.map50), "theirs_map50_95": float(theirs.box.map)}
    print("crosscheck:", result)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["map50", "map50_95"])
def test_map_agrees_with_ultralytics_validator(crosscheck: dict[str, float], metric: str) -> None:
    ours, theirs = crosscheck[f"ours_{metric}"], crosscheck[f"theirs_{metric}"]
    assert theirs > 0.5, f"the default model scores {theirs:.3f} {metric} in Ultralytics: not a meaningful check"
    assert abs(ours - theirs) <= TOLERANCE, f"{metric}: ours {ours:.4f}, Ultralytics {theirs:.4f}"
