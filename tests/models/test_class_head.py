"""Widening a detector's class head for a class reviewers added: the old classes' outputs are
unchanged, the new class starts at the prior, and the checkpoint trains with Ultralytics as is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.checkpoint import make_dev_checkpoint  # noqa: E402
from models.class_head import widen_class_head  # noqa: E402
from models.split_rebuild import layers_changed  # noqa: E402
from models.taxonomy import DEFAULT_CLASSES  # noqa: E402


@pytest.fixture(scope="module")
def dev_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_cfg")))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (160, 160, 3), dtype=np.uint8) for _ in range(2)]
    return make_dev_checkpoint(tmp_path_factory.mktemp("ck") / "dev.pt", bn_frames=frames, imgsz=160)


def _model(path: Path) -> Any:
    from ultralytics import YOLO

    return YOLO(str(path), task="detect").model.float().eval()


def test_old_classes_unchanged_new_class_at_prior(dev_ckpt: Path, tmp_path: Path) -> None:
    names = [*DEFAULT_CLASSES, "porosity"]
    out = widen_class_head(dev_ckpt, names, tmp_path / "wide.pt")
    old, new = _model(dev_ckpt), _model(out)
    assert new.names == dict(enumerate(names)) and new.model[-1].nc == 5 and new.yaml["nc"] == 5
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        ya, yb = old(x)[0], new(x)[0]
    assert yb.shape[1] == ya.shape[1] + 1  # 4 box + nc scores per anchor
    # boxes and the four old scores: the same (to float rounding: a 5-row conv may be computed in
    # another order than a 4-row one)
    assert torch.allclose(ya, yb[:, : ya.shape[1]], rtol=1e-5, atol=1e-4)
    assert float(yb[:, -1].max()) < 0.05  # the new class starts near the prior (~0.004 at 640 px)
    assert layers_changed(old.state_dict(), new.state_dict(), last=21) == []
    assert layers_changed(old.state_dict(), new.state_dict(), last=22) != []  # the head did change


@pytest.mark.parametrize(("names", "error"), [
    (["crack", "scratch", "dent", "stain", "porosity"], "must start with"),
    (["scratch", "crack", "dent"], "must start with"),
])
def test_classes_must_extend_the_old_ones(dev_ckpt: Path, tmp_path: Path, names: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        widen_class_head(dev_ckpt, names, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_layers_changed_ignores_ulps_not_changes() -> None:
    a = {"model.0.conv.weight": torch.ones(4, 3), "model.5.bn.running_mean": torch.zeros(3),
         "model.9.x": torch.tensor([1, 2]), "other": torch.ones(1)}
    b = {k: v.clone() for k, v in a.items()}
    b["model.0.conv.weight"][0, 0] += 1e-5  # EMA rounding
    assert layers_changed(a, b, last=9) == []
    b["model.5.bn.running_mean"][1] = 0.5
    b["model.9.x"][0] = 3
    b["other"][0] = 7  # not a layer: ignored
    assert layers_changed(a, b, last=9) == ["model.5.bn.running_mean", "model.9.x"]
    assert layers_changed(a, b, last=4) == []
