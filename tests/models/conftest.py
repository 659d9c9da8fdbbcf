"""Shared fixtures for tests/models: tiny datasets written with cv2, and a random-init YOLOv8n ONNX."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

NAMES = ["scratch", "crack", "dent", "stain"]


def write_dataset(
    root: Path,
    images: dict[str, dict[str, dict]],
    names: list[str] = NAMES,
) -> Path:
    """Write an Ultralytics-layout dataset.

    ``images[split][stem] = {"size": (w, h), "labels": str | None, "parts": list | None, "ext": ".jpg"}``;
    ``labels=None`` means no label file, ``parts=None`` no sidecar.
    """
    cfg = {"path": str(root), "names": dict(enumerate(names))}
    for split, items in images.items():
        cfg[split] = f"images/{split}"
        for d in ("images", "labels", "parts"):
            (root / d / split).mkdir(parents=True, exist_ok=True)
        for stem, spec in items.items():
            w, h = spec.get("size", (64, 48))
            img = np.full((h, w, 3), 90, np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{stem}{spec.get('ext', '.jpg')}"), img)
            if spec.get("labels") is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(spec["labels"])
            if spec.get("parts") is not None:
                (root / "parts" / split / f"{stem}.json").write_text(json.dumps({"parts": spec["parts"]}))
    (root / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def yolo_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init YOLOv8n (nc=4) exported at imgsz=320: {"dynamic": path, "fixed": path (batch 1)}."""
    pytest.importorskip("ultralytics")
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics import YOLO
    from ultralytics.utils import ROOT

    d = tmp_path_factory.mktemp("onnx")
    cfg = yaml.safe_load((ROOT / "cfg/models/v8/yolov8.yaml").read_text())
    cfg["nc"] = len(NAMES)
    (d / "yolov8n-lg.yaml").write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(d)  # the exporter writes next to the model / into the working directory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's legacy-exporter and tracer warnings
            model = YOLO(str(d / "yolov8n-lg.yaml"))
            model.model.names = dict(enumerate(NAMES))
            out = {}
            for key, dynamic in (("dynamic", True), ("fixed", False)):
                path = Path(model.export(format="onnx", imgsz=320, dynamic=dynamic, simplify=False, batch=1))
                out[key] = path.rename(d / f"{key}.onnx")
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture
def make_dataset(tmp_path: Path):
    """``make_dataset(images, names=NAMES, sub="ds") -> root`` (see :func:`write_dataset`)."""

    def make(images: dict[str, dict[str, dict]], names: list[str] = NAMES, sub: str = "ds") -> Path:
        return write_dataset(tmp_path / sub, images, names)

    return make
