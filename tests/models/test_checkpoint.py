"""Ultralytics checkpoints: facts read back, stripping, and refusals of what is not one."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.checkpoint import CheckpointError, checkpoint_info, make_dev_checkpoint, strip_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dev_checkpoint(tmp_path_factory.mktemp("ck") / "dev.pt", ["scratch", "burr"], imgsz=64)


def test_facts_of_a_dev_checkpoint(dev: Path) -> None:
    info = checkpoint_info(dev)
    assert info["classes"] == ["scratch", "burr"]
    assert not info["has_optimizer"] and not info["has_ema"]


def test_a_stripped_checkpoint_is_copied_as_it_is(dev: Path, tmp_path: Path) -> None:
    out = strip_checkpoint(dev, tmp_path / "stripped.pt")
    assert out.read_bytes() == dev.read_bytes()


@pytest.mark.parametrize(("content", "error"), [
    ({"weights": [1, 2]}, "not an Ultralytics checkpoint"),
    ([1, 2, 3], "not an Ultralytics checkpoint"),
])
def test_not_a_checkpoint(tmp_path: Path, content: object, error: str) -> None:
    import torch

    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=error):
        checkpoint_info(path)


def test_unsupported_dev_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unsupported dev cfg"):
        make_dev_checkpoint(tmp_path / "x.pt", cfg="rtdetr-l.yaml")
