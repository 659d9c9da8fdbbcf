"""The edge-side model modules must import without torch / torchvision / ultralytics installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "torchvision", "ultralytics")

#: Modules that ship to the edge and therefore must not need the training stack.
TORCH_FREE_MODULES = [
    "models.detections",
    "models.processing",
    "models.dataset_io",
    "models.metrics",
    "models.onnx_predict",
    "models.evaluate",
    "models.bundle",
    "models.onnx_meta",
    "models.release",
    "models.feature_codec",
    "models.signing",
    "models.split_runtime",
    "models.synth",
    "models.cli",
    "edge_agent.detector",
    "edge_agent.sources",
    "edge_agent.replay",
    "edge_agent.golden",
    "edge_agent.cli",
    "edge_agent.agent",
    "edge_agent.runtime",
    "edge_agent.torch_detector",
    "edge_agent.batcher",
    "edge_agent.capture",
    "edge_agent.source_api",
    "edge_agent.sampler",
    "edge_agent.outbox",
    "edge_agent.uplink",
    "edge_agent.split_detector",
    "edge_agent.bundle_store",
    "edge_agent.swap",
    "hub.head_service",
    "hub.heads",
    "edge_agent.mqtt",
    "edge_agent.metrics",
    "edge_agent.config",
    "lineguard_contract",
    "lineguard_contract",
]

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked import of {{name}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=BLOCKED) + code],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_blocker_really_blocks():
    proc = run_python("import torch")
    assert proc.returncode != 0 and "blocked import of torch" in proc.stderr


@pytest.mark.parametrize("module", TORCH_FREE_MODULES)
def test_imports_without_torch(module):
    code = textwrap.dedent(
        f"""
        import importlib, sys
        importlib.import_module({module!r})
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_model_cli_starts_without_opencv() -> None:
    """`lineguard-model --help` and the commands that need no image work do not load OpenCV
    (the synthetic-line package exports lazily)."""
    code = "import sys, models.cli; assert 'cv2' not in sys.modules, 'cv2 loaded'; " \
           "from models.synth import generate_dataset; assert 'cv2' in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
