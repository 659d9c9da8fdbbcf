"""Backend choice and the PyTorch backend against the ONNX one on the same frame."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.detector import DetectorError, OnnxDetector
from edge_agent.runtime import create_detector

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "default"
SAMPLE = REPO / "sample_data" / "line_1080p.mp4"


def _frame(index: int = 45) -> np.ndarray:
    cap = cv2.VideoCapture(str(SAMPLE))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, img = cap.read()
    cap.release()
    assert ok
    return img


def test_auto_on_a_cpu_host_is_onnxruntime_int8() -> None:
    det = create_detector(str(BUNDLE))
    assert isinstance(det, OnnxDetector) and det.role == "onnx_int8"


def test_auto_without_torch_installed_is_onnxruntime() -> None:
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "torchvision", "ultralytics"}:
                    raise ModuleNotFoundError(f"blocked import of {name}", name=name)
        sys.meta_path.insert(0, Blocker())
        from edge_agent.runtime import create_detector
        det = create_detector(sys.argv[1])
        det.load()
        print(type(det).__name__, det.provider)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, str(BUNDLE)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OnnxDetector", "CPUExecutionProvider"]


@pytest.mark.parametrize(("runtime", "error"), [("tensorflow", "unknown runtime"), ("torch", "cannot run here")])
def test_bad_or_unavailable_runtime_is_an_error(runtime: str, error: str) -> None:
    torch = pytest.importorskip("torch")
    if runtime == "torch" and torch.cuda.is_available():
        pytest.skip("this host has CUDA: torch can run")
    with pytest.raises(DetectorError, match=error):
        create_detector(str(BUNDLE), runtime=runtime)


def test_torch_backend_matches_onnx_fp32() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    from edge_agent.torch_detector import TorchDetector
    from models.bundle import load_bundle

    frame = _frame()
    onnx = OnnxDetector(load_bundle(BUNDLE, roles=("onnx_fp32",)), role="onnx_fp32", conf=0.1)
    onnx.load()
    pt = TorchDetector(load_bundle(BUNDLE, roles=("checkpoint",)), device="cpu", half=False, conf=0.1)
    pt.load()
    a, b = onnx.detect([frame])[0], pt.detect([frame])[0]
    assert len(a) > 0 and len(a) == len(b)
    ia, ib = np.argsort(-a.scores), np.argsort(-b.scores)
    np.testing.assert_allclose(a.scores[ia], b.scores[ib], atol=2e-3)
    np.testing.assert_allclose(a.boxes[ia], b.boxes[ib], atol=1.0)
    assert (a.class_ids[ia] == b.class_ids[ib]).all()


@pytest.mark.gpu
def test_torch_fp16_on_cuda_matches_onnx_fp32() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from edge_agent.torch_detector import TorchDetector

    det = create_detector(str(BUNDLE))
    assert isinstance(det, TorchDetector)
    det.load()
    assert det.provider == "torch:cuda:0:fp16"
    frame = _frame()
    from models.bundle import load_bundle

    ref = OnnxDetector(load_bundle(BUNDLE, roles=("onnx_fp32",)), role="onnx_fp32")
    ref.load()
    a, b = ref.detect([frame])[0], det.detect([frame])[0]
    assert abs(len(a) - len(b)) <= 1


def test_prepared_in_another_thread_gives_the_same_detections() -> None:
    from models.bundle import load_bundle

    det = OnnxDetector(load_bundle(BUNDLE, roles=("onnx_int8",)), conf=0.05)
    det.load()
    frames = [_frame(30), _frame(45), _frame(60)]
    direct = det.detect(frames)
    prepared = det.detect_prepared([det.prepare(f) for f in frames])
    assert sum(len(d) for d in direct) > 0
    for a, b in zip(direct, prepared, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
