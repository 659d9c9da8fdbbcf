"""Agent configuration: valid files load, bad keys are named, secrets come from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import AgentConfig, ConfigError, build_config, load_config

CAM = {"id": "cam1", "source": "sample_data/line_1080p.mp4"}


def test_example_config_in_deploy_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "deploy" / "agent" / "station.yaml")
    assert isinstance(cfg, AgentConfig)
    assert cfg.mqtt.tls and cfg.mqtt.username  # the deployed example speaks TLS with a per-device user
    assert cfg.cameras


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"cameras": [CAM], "mqtt": {"urll": "mqtt://h:1"}}, "mqtt.urll: unknown key"),
        ({"cameras": [CAM], "batching": {"latency_slo_ms": -5}}, "batching.latency_slo_ms"),
        ({"cameras": [CAM], "mqtt": {"url": "http://h:1883"}}, "mqtt.url"),
        ({"cameras": [CAM], "mqtt": {"url": "mqtt://h:99999"}}, "mqtt.url"),
        ({"cameras": []}, "cameras"),
        ({"cameras": [CAM, CAM]}, "repeated: ['cam1']"),
        ({"cameras": [{"id": "bad id!", "source": "x"}]}, "cameras.0.id"),
        ({"cameras": [CAM], "sampling": {"uncertain_band": [0.5, 0.2]}}, "sampling.uncertain_band"),
        ({"cameras": [CAM], "identity": {"site": "a/b"}}, "identity.site"),
        ({"cameras": [CAM], "model": {"runtime": "tensorflow"}}, "model.runtime"),
        ({"cameras": [CAM], "bogus": 1}, "bogus: unknown key"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(data, "station.yaml")
    assert error in str(ei.value)
    assert "station.yaml" in str(ei.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [("mqtt://broker:1883", "broker", 1883, False), ("mqtts://broker", "broker", 8883, True),
     ("mqtt://10.0.0.2", "10.0.0.2", 1883, False)],
)
def test_mqtt_url(url: str, host: str, port: int, tls: bool) -> None:
    m = build_config({"cameras": [CAM], "mqtt": {"url": url}}).mqtt
    assert (m.host, m.port, m.tls) == (host, port, tls)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("cameras: [{id: cam1, source: a.mp4}]\nmqtt: {url: 'mqtt://a:1'}\n")
    cfg = load_config(f, {"mqtt.url": "mqtt://b:2", "identity.station": "st9"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.identity.station) == ("b", 2, "st9")
    assert cfg.identity.client_id == "site1-line1-st9"


def test_password_from_env_or_file_never_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="mqtt.password: unknown key"):
        build_config({"cameras": [CAM], "mqtt": {"password": "hunter2"}})
    monkeypatch.setenv("LG_TEST_PW", "from-env")
    cfg = build_config({"cameras": [CAM], "mqtt": {"password_env": "LG_TEST_PW"}})
    assert cfg.mqtt.password() == "from-env"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    cfg = build_config({"cameras": [CAM], "mqtt": {"password_file": str(secret)}})
    assert cfg.mqtt.password() == "from-file"
    cfg = build_config({"cameras": [CAM], "mqtt": {"password_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="mqtt.password_file"):
        cfg.mqtt.password()
