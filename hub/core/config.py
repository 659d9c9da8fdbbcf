"""The hub's configuration, validated before anything starts.

Every section refuses unknown keys (``extra="forbid"``), so a typo is an error naming the key.
Secrets never live in the configuration: the MQTT password is read at start from the
environment variable named by ``mqtt.password_env``. Nothing here is built at import time:
``main`` (or a test) calls :func:`build_config` or :func:`load_config`.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lineguard_contract import MAX_PAYLOAD_BYTES
from lineguard_contract.connection import BrokerSettings, describe_validation_error, read_yaml_mapping
from lineguard_contract.topics import SEGMENT_PATTERN

__all__ = ["ConfigError", "HubConfig", "HubHeadsConfig", "HubHttpConfig", "HubMqttConfig", "HubRetrainConfig",
           "HubRolloutConfig", "build_config", "load_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key."""


class HubMqttConfig(BrokerSettings):
    """``url``, ``username``, ``ca_file``, ``keepalive_s`` come from the contract."""

    password_env: str = Field("LINEGUARD_HUB_MQTT_PASSWORD", min_length=1)
    client_id: str | None = Field(None, pattern=SEGMENT_PATTERN,
                                  description="stable per worker (persistent session); default <group>-<host>")
    shared_group: str = Field("lineguard-hub", pattern=SEGMENT_PATTERN,
                              description="$share group: workers of one group split the samples")

    def resolved_client_id(self) -> str:
        return self.client_id or f"{self.shared_group}-{socket.gethostname()}"[:64]



class HubHttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="0.0.0.0 to serve other machines (put TLS in front)")
    port: int = Field(8080, ge=1, le=65535)
    cookie_secure: bool = Field(False, description="mark session cookies Secure (set when served over HTTPS)")
    session_hours: float = Field(12.0, gt=0, le=24 * 30)


class HubHeadsConfig(BaseModel):
    """The head service for agents in split mode (issue 5); absent: no head service."""

    model_config = ConfigDict(extra="forbid")
    bundles: list[Path] = Field(min_length=1, description="every bundle whose split head is still deployed")
    bundles_dir: Path | None = Field(None, description="a version an agent asks for that is not in `bundles` is "
                                     "loaded from <bundles_dir>/<version> on its first frame (split agents that took "
                                     "an update); default: data_dir/bundles when the hub retrains, else none")
    max_batch: int = Field(32, ge=1, le=256, description="frames per head run at most")
    max_delay_ms: float = Field(5.0, ge=0, le=100, description="wait for a fuller batch once one frame is there")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: all cores)")
    runtime: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: the bundle's split_hub with ONNX Runtime; torch: rebuilt from the checkpoint and "
                            "split_bottleneck in torch, NMS on the device (a GPU hub; needs the train extra)")
    device: str = Field("cuda", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch runtime only")
    half: bool = Field(True, description="torch runtime on CUDA: FP16 autocast")
    group: str = Field("lineguard-heads", pattern=SEGMENT_PATTERN,
                       description="$share group: head processes of one group split the frames")
    dead_letter_keep: int = Field(1000, ge=0, description="undecodable feature messages kept in data_dir")
    keep_idle_h: float = Field(24.0, gt=0, description="a head loaded from bundles_dir that ran no frame for this "
                               "long is unloaded (loaded again when asked for); the `bundles` heads stay")


class HubRetrainConfig(BaseModel):
    """Incremental retraining (issue 6; hub/retrain.py); absent: no retraining on this hub."""

    model_config = ConfigDict(extra="forbid")
    schedule: str | None = Field("0 2 * * mon", description="cron (UTC) for `serve` to start a job; null: manual only")
    golden: Path = Field(description="the fixed golden dataset (a val split) the gate scores every candidate on")
    replay_data: Path | None = Field(None, description="earlier training data; a replay buffer is drawn from it")
    replay_images: int = Field(600, ge=0, description="replay buffer size (training images)")
    replay_val_images: int | None = Field(None, ge=0, description="replay frames in validation, where the operating "
                                                                   "threshold is picked; default: replay_images / 4")
    reviewed_repeats: int = Field(1, ge=1, le=8, description="times each reviewed training frame is placed "
                                                             "beside the replay buffer")
    preset: str = Field("auto", pattern=r"^(auto|retrain(-ci|-cpu)?)$",
                        description="models/train.py preset; auto: retrain on a GPU hub, retrain-cpu without one")
    epochs: int | None = Field(None, ge=1, description="override the preset's epochs")
    hours: float | None = Field(None, gt=0, description="cap the training's wall time")
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?|\d+)$", description="default: Ultralytics' choice")
    workers: int | None = Field(None, ge=0, description="data loader workers; default: a core each up to 8 on a GPU "
                                                         "hub (the loader feeds the GPU), 2 on a CPU hub")
    score_workers: int | None = Field(None, ge=1, description="processes scoring the candidate (release, gate); "
                                                             "default: 1 below 4 cores, else half the cores (<= 8)")
    calib_images: int = Field(100, ge=8, description="INT8 calibration frames")
    split_retune_steps: int = Field(200, ge=0, description="split production: bottleneck fine-tuning steps when "
                                                           "training changed the device part's layers; 0: refuse")
    split_parts: Literal["auto", "always", "never"] = Field(
        "auto", description="split production: build the candidate's split parts; auto: unless every agent heard "
                            "from in 30 days reports full mode in its heartbeats")
    min_reviewed: int = Field(50, ge=1, description="do not retrain on fewer reviewed samples")
    val_share: float = Field(0.2, gt=0, lt=1, description="reviewed samples held out as the gate's new data")
    signing_key_file: Path | None = Field(None, description="Ed25519 private key (PEM); default "
                                                            "$LINEGUARD_SIGNING_KEY_FILE")
    max_recall_drop_points: float = Field(1.0, ge=0, le=100, description="gate: per class on the golden set")
    max_split_map50_drop_points: float | None = Field(
        1.0, ge=0, le=100, description="gate: a split candidate's parts' golden mAP50 below its whole model's; "
                                       "null: not checked")
    max_false_alarm_rise_points: float | None = Field(
        1.0, ge=0, le=100, description="gate: candidate part false-alarm rate minus production's on the golden set "
                                       "(needs its parts sidecars); null: not checked")
    min_new_data_gain_points: float = Field(0.0, ge=-100, le=100,
                                            description="gate: candidate mAP50 minus production's on the new data")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            from hub.schedule import CronSchedule

            CronSchedule.parse(v)  # CronError (a ValueError) names the bad field
        return v

    @model_validator(mode="after")
    def _preset_fits_device(self) -> HubRetrainConfig:
        if self.preset == "retrain" and self.device == "cpu":
            raise ValueError("preset 'retrain' with device 'cpu': that preset trains every layer and fine-tunes the "
                             "split bottleneck, hours on a CPU; use preset 'retrain-cpu' (or 'auto')")
        return self


class HubRolloutConfig(BaseModel):
    """Over-the-air updates and the staged rollout (issue 6; hub/rollout.py, hub/canary.py)."""

    model_config = ConfigDict(extra="forbid")
    public_url: str = Field(pattern=r"^https?://[^\s/]+(:\d+)?(/[^\s]*)?$",
                            description="how agents reach this hub's API (HTTPS in production)")
    canary_share: float = Field(0.1, gt=0, le=1, description="share of stations a canary goes to")
    window_min: float = Field(60.0, gt=0, description="canary observed this long before promotion")
    min_samples: int = Field(20, ge=0, description="samples of each group before the sample checks count")
    auto: bool = Field(True, description="serve: start a canary for a candidate that passed the gate, then "
                                         "promote or roll back on the canary's verdict")
    check_s: float = Field(60.0, ge=1, description="how often serve checks running canaries")


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("var/hub")
    production: bool = Field(False, description="refuse demo shortcuts: no demo user, admin from the environment")
    http: HubHttpConfig = HubHttpConfig()
    embedded_broker: bool | None = Field(
        None, description="run the embedded MQTT broker on mqtt.url's port; default: when no mqtt section is given")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/hub.sqlite3")
    mqtt: HubMqttConfig = HubMqttConfig()
    heads: HubHeadsConfig | None = None
    retrain: HubRetrainConfig | None = None
    rollout: HubRolloutConfig | None = None
    max_payload_bytes: int = Field(MAX_PAYLOAD_BYTES, ge=1024, le=MAX_PAYLOAD_BYTES,
                                   description="larger messages go to dead letters unparsed")

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                make_url(v)
            except ArgumentError as e:
                raise ValueError(f"not a database URL: {e}") from e
        return v

    @model_validator(mode="after")
    def _defaults(self) -> HubConfig:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'hub.sqlite3'}"
        if self.embedded_broker is None:
            self.embedded_broker = "mqtt" not in self.model_fields_set
        if self.production and self.embedded_broker:
            raise ValueError("production: configure mqtt (Mosquitto or EMQX with TLS and ACLs); "
                             "the embedded broker has no authentication")
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None  # filled by the validator
        return self.database_url

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


def build_config(data: Mapping[str, Any] | None = None, origin: str = "hub config") -> HubConfig:
    """A validated :class:`HubConfig`; :class:`ConfigError` naming every bad key otherwise."""
    try:
        return HubConfig.model_validate(dict(data or {}))
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid configuration:\n{describe_validation_error(e)}") from None


def load_config(path: Path | str) -> HubConfig:
    """Read a YAML file and validate it with :func:`build_config`."""
    try:
        loaded = read_yaml_mapping(path)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return build_config(loaded, origin=str(path))
