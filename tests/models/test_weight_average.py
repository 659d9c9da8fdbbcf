"""Weight averaging of a tuned detector with its start: the mix is exact per tensor, the classes
the start did not know keep their tuned rows, and networks that do not match are refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.checkpoint import CheckpointError, checkpoint_info, make_dev_checkpoint  # noqa: E402
from models.class_head import widen_class_head  # noqa: E402
from models.taxonomy import DEFAULT_CLASSES  # noqa: E402
from models.weight_average import average_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(start: a 4-class dev model, tuned: the same widened to 5 classes with every weight moved)."""
    import numpy as np

    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_cfg")))
    d = tmp_path_factory.mktemp("wa")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (160, 160, 3), dtype=np.uint8) for _ in range(2)]
    start = make_dev_checkpoint(d / "start.pt", bn_frames=frames, imgsz=160)
    wide = widen_class_head(start, [*DEFAULT_CLASSES, "porosity"], d / "wide.pt")
    ck = torch.load(str(wide), map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ck["model"].state_dict().values():
            if t.is_floating_point():
                t += (0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    torch.save(ck, str(d / "tuned.pt"))
    return start, d / "tuned.pt"


def _sd(path: Path) -> dict[str, Any]:
    ck = torch.load(str(path), map_location="cpu", weights_only=False)
    sd = (ck.get("ema") or ck["model"]).state_dict()
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_every_tensor_is_the_mix_and_new_rows_stay_tuned(pair: tuple[Path, Path], tmp_path: Path, a: float) -> None:
    start, tuned = pair
    out = average_checkpoints(start, tuned, a, tmp_path / "mix.pt")
    s, t, m = _sd(start), _sd(tuned), _sd(out)
    assert set(m) == set(t)
    widened = 0
    for k, v in m.items():
        if not v.is_floating_point():
            assert torch.equal(v, t[k])
        elif s[k].shape == v.shape:
            assert torch.allclose(v, (1 - a) * t[k] + a * s[k], rtol=2e-3, atol=2e-3), k  # FP16 storage
        else:
            widened += 1
            assert torch.allclose(v[:4], (1 - a) * t[k][:4] + a * s[k], rtol=2e-3, atol=2e-3), k
            assert torch.equal(v[4:], t[k][4:]), k  # porosity: the tuned rows whatever a
    assert widened == 6  # weight and bias of the 3 scales' class convolutions
    info = checkpoint_info(out)
    assert info["classes"] == [*DEFAULT_CLASSES, "porosity"] and not info["has_optimizer"] and not info["has_ema"]


@pytest.mark.parametrize(("swap", "a", "error"), [
    (False, 1.5, "start_weight"),
    (False, -0.1, "start_weight"),
    (True, 0.5, "do not start with"),  # the 5-class model as the start of the 4-class one
])
def test_refused(pair: tuple[Path, Path], tmp_path: Path, swap: bool, a: float, error: str) -> None:
    start, tuned = pair
    if swap:
        start, tuned = tuned, start
    with pytest.raises((ValueError, CheckpointError), match=error):
        average_checkpoints(start, tuned, a, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_not_a_checkpoint(pair: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, str(bad))
    with pytest.raises(CheckpointError, match="not an Ultralytics checkpoint"):
        average_checkpoints(pair[0], bad, 0.5, tmp_path / "x.pt")
