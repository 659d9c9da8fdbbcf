"""Cutting a YOLOv8 detector: which layers cross the cut, and edge + hub == the whole model."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from models.split import needed_outputs, raw_feature_bytes, split_model  # noqa: E402


@pytest.fixture(scope="module")
def yolov8n() -> Any:
    from models.offline import configure_offline

    configure_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=4, verbose=False)  # built from the yaml: no download
    return model.eval()


@pytest.mark.parametrize("cut,expected", [
    (3, [3]), (4, [4]), (6, [4, 6]), (9, [4, 6, 9]), (15, [9, 12, 15]), (21, [15, 18, 21]),
])
def test_needed_outputs_follow_the_graph(yolov8n: Any, cut: int, expected: list[int]) -> None:
    assert needed_outputs(yolov8n.model, cut) == expected


@pytest.mark.parametrize("cut", [-1, 22, 30])
def test_a_cut_must_leave_layers_on_both_sides(yolov8n: Any, cut: int) -> None:
    with pytest.raises(ValueError, match="cut"):
        needed_outputs(yolov8n.model, cut)


@pytest.mark.parametrize("cut", [3, 4, 9, 15])
def test_edge_then_hub_equals_the_whole_model(yolov8n: Any, cut: int) -> None:
    x = torch.rand(2, 3, 128, 160)
    edge, hub, outputs = split_model(yolov8n, cut)
    with torch.no_grad():
        whole = yolov8n(x)[0]
        feats = edge(x)
        split = hub(*feats)[0]
    assert len(feats) == len(outputs)
    assert split.shape == whole.shape
    assert torch.allclose(split, whole, atol=1e-5)
    with pytest.raises(ValueError, match="feature tensors"):
        hub(*feats[:-1]) if len(feats) > 1 else hub(feats[0], feats[0])


def test_raw_features_after_sppf_cost_more_than_the_frame(yolov8n: Any) -> None:
    """The field's figure: cut after SPPF at 640x640, YOLOv8n sends 716,800 values a frame."""
    edge, _, _ = split_model(yolov8n, 9)
    with torch.no_grad():
        feats = edge(torch.rand(1, 3, 640, 640))
    assert [tuple(t.shape[1:]) for t in feats] == [(64, 80, 80), (128, 40, 40), (256, 20, 20)]
    assert raw_feature_bytes(feats, bits=8) == 716_800
    assert raw_feature_bytes(feats, bits=32) == 4 * 716_800
