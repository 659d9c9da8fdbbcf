"""Swapping the model in a running agent: the new one loads beside the old, the switch happens
between batches, no frame is dropped, and a frame letterboxed by the old model runs on it."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.batcher import AdaptiveBatcher, Result
from edge_agent.detector import DetectorError, OnnxDetector, Prepared
from edge_agent.sources import FileStreamSource
from edge_agent.swap import SwappableDetector
from models.bundle import load_bundle, write_bundle
from models.detections import Detections
from models.onnx_meta import write_metadata

ROOT = Path(__file__).resolve().parents[2]
NEW = "9.0.0"  # a version above the shipped bundle's


class Counting(OnnxDetector):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.frames = 0

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        self.frames += len(items)
        return super().detect_prepared(items)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    old = load_bundle(ROOT / "models" / "default", roles=("onnx_int8",))
    work = tmp_path_factory.mktemp("swap")
    onnx = work / "model_int8.onnx"
    shutil.copyfile(old.path("onnx_int8"), onnx)
    write_metadata(onnx, {"bundle_version": NEW})
    m = old.manifest
    write_bundle(work / "new", name=m.name, version=NEW, parent_version=m.version, classes=m.classes,
                 input_size=m.input_size, files={"onnx_int8": onnx}, postprocessing=m.postprocessing)
    return old, load_bundle(work / "new", roles=("onnx_int8",))


def test_swap_in_a_running_batcher_drops_no_frame(bundles: tuple[Any, Any]) -> None:
    old_b, new_b = bundles
    old, new = Counting(old_b, workers=1), Counting(new_b, workers=1)
    sw = SwappableDetector(old)
    sw.load()
    versions: list[str] = []
    lock = threading.Lock()

    def on_results(results: list[Result]) -> None:
        with lock:
            versions.extend(sw.version for _ in results)

    src = FileStreamSource(ROOT / "sample_data" / "line_1080p.mp4", "cam1", loop=True)
    src.transform = sw.prepare
    batcher = AdaptiveBatcher(sw, on_results=on_results)
    batcher.add_source(src)
    src.start()
    batcher.start()
    try:
        time.sleep(2.0)
        assert sw.swap(new) == old_b.manifest.version
        time.sleep(2.0)
    finally:
        batcher.stop()
        src.close()
    st = batcher.stats()
    assert st.frames == old.frames + new.frames and st.frames > 10
    assert old.frames > 0 and new.frames > 0, (old.frames, new.frames)
    assert st.detector_errors == 0 and st.frames_failed == 0  # no batch failed, no frame lost to the swap
    assert versions[0] == old_b.manifest.version and versions[-1] == NEW and sw.version == NEW


def test_a_frame_prepared_before_the_swap_runs_on_the_old_model(bundles: tuple[Any, Any]) -> None:
    old_b, new_b = bundles
    old, new = Counting(old_b, workers=1), Counting(new_b, workers=1)
    sw = SwappableDetector(old)
    sw.load()
    img = np.full((1080, 1920, 3), 114, np.uint8)
    before = sw.prepare(img)
    sw.swap(new)
    after = sw.prepare(img)
    out = sw.detect_prepared([before, after])
    assert len(out) == 2 and (old.frames, new.frames) == (1, 1)  # each model ran exactly its own frame
    sw.swap(Counting(old_b, workers=1))
    with pytest.raises(ValueError, match="no longer loaded"):
        sw.detect_prepared([before])


def test_a_model_that_does_not_load_leaves_the_old_one_running(bundles: tuple[Any, Any], tmp_path: Path) -> None:
    old_b, new_b = bundles
    sw = SwappableDetector(OnnxDetector(old_b, workers=1))
    sw.load()
    broken = OnnxDetector(new_b, workers=1)
    broken.path = tmp_path / "missing.onnx"
    with pytest.raises(DetectorError):
        sw.swap(broken)
    assert sw.version == old_b.manifest.version and len(sw.detect([np.zeros((720, 1280, 3), np.uint8)])) == 1
