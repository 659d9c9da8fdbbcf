"""Bottleneck training is deterministic (the gate's split check must not change between two runs of
one candidate) and leaves the process's PyTorch settings as it found them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.bundle import load_bundle  # noqa: E402
from models.split_train import deterministic_torch, load_bottleneck, train_bottleneck  # noqa: E402

PRODUCTION = Path(__file__).resolve().parents[2] / "models" / "default"


def _settings() -> tuple[bool, bool, bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


@pytest.mark.parametrize("before", [(False, False, False, False), (True, True, True, False),
                                    (True, False, False, True)])
def test_deterministic_torch_restores_the_settings(before: tuple[bool, bool, bool, bool]) -> None:
    saved = _settings()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
    try:
        torch.manual_seed(123)
        expected_next = torch.rand(1)
        torch.manual_seed(123)
        with deterministic_torch():
            assert _settings() == (True, True, True, False)
            assert "CUBLAS_WORKSPACE_CONFIG" in os.environ
            torch.rand(5)
        assert _settings() == before
        assert torch.rand(1) == expected_next  # the caller's random stream goes on as if nothing happened
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _fine_tune(device: str) -> dict[str, Any]:
    from ultralytics import YOLO

    prod = load_bundle(PRODUCTION, roles=("checkpoint", "split_bottleneck"))
    bn, info = load_bottleneck(prod.path("split_bottleneck"))
    model = YOLO(str(prod.path("checkpoint")), task="detect").model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 128, 224, 3), dtype=np.uint8)
    labels = [np.array([[i % 4, 0.5, 0.5, 0.2, 0.3]], np.float32) for i in range(4)]
    out, tinfo = train_bottleneck(model, images, labels, cut=int(info["cut"]), width=int(info["width"]),
                                  bits=int(info["bits"]), stride=int(info["stride"]), hidden=info.get("hidden"),
                                  steps1=0, steps2=3, batch=2, device=device, progress=False, init=bn, tune_hub=0.1)
    return {**{f"bn.{k}": v for k, v in out.state_dict().items()},
            **{f"hub.{k}": v for k, v in tinfo["hub_tuned"].items()}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_fine_tuning_twice_gives_the_same_weights(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    first, second = _fine_tune(device), _fine_tune(device)
    assert _same(first, second)
    prod_bn, _ = load_bottleneck(load_bundle(PRODUCTION, roles=("split_bottleneck",)).path("split_bottleneck"))
    assert any(not torch.equal(first[f"bn.{k}"], v) for k, v in prod_bn.state_dict().items())  # it did train


@pytest.mark.parametrize(("tune_hub", "error"), [(0.1, None), (0.0, "needs tune_hub > 0")])
def test_hub_tuning_starts_from_hub_init(tune_hub: float, error: str | None) -> None:
    """``hub_init`` is where the tuned hub layers start (at learning rate 0 they stay there)."""
    from ultralytics import YOLO

    prod = load_bundle(PRODUCTION, roles=("checkpoint", "split_bottleneck"))
    bn, info = load_bottleneck(prod.path("split_bottleneck"))
    model = YOLO(str(prod.path("checkpoint")), task="detect").model
    start = {k: v.float() + 0.5 if v.is_floating_point() else v for k, v in info["hub_tuned"].items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.3]], np.float32)] * 2

    def run() -> dict[str, Any]:
        return train_bottleneck(model, images, labels, cut=int(info["cut"]), width=int(info["width"]),
                                bits=int(info["bits"]), stride=int(info["stride"]), hidden=info.get("hidden"),
                                steps1=0, steps2=1, batch=2, lr=0.0, device="cpu", progress=False, init=bn,
                                tune_hub=tune_hub, hub_init=start)[1]

    if error:
        with pytest.raises(ValueError, match=error):
            run()
        return
    tuned = run()["hub_tuned"]
    assert tuned.keys() == start.keys()
    assert all(torch.equal(tuned[k].float(), start[k].float()) for k in start)
