"""The agent's configuration: one YAML file per camera station, validated before anything starts.

Every section rejects unknown keys (``extra="forbid"``), so a typo is an error that names the key
instead of a silently ignored setting. Secrets never live in the file: the MQTT password comes
from the environment variable named by ``mqtt.password_env`` or from ``mqtt.password_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lineguard_contract.connection import BrokerSettings, describe_validation_error, read_yaml_mapping

__all__ = [
    "AgentConfig", "BatchingConfig", "CameraConfig", "ConfigError", "IdentityConfig", "MetricsConfig",
    "ModelConfig", "MqttConfig", "OutboxConfig", "SamplingConfig", "build_config", "load_config",
]

_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentityConfig(_Strict):
    site: str = Field("site1", pattern=_ID)
    line: str = Field("line1", pattern=_ID)
    station: str = Field("station1", pattern=_ID)
    agent_id: str | None = Field(None, pattern=_ID, description="MQTT client id; default site-line-station")

    @property
    def client_id(self) -> str:
        return self.agent_id or f"{self.site}-{self.line}-{self.station}"


class CameraConfig(_Strict):
    id: str = Field(pattern=_ID)
    source: str = Field(min_length=1, description="file path, folder, rtsp://..., or a USB index / /dev/videoN")
    kind: Literal["auto", "file", "folder", "rtsp", "usb"] = "auto"
    realtime: bool = Field(True, description="pace recorded video at its own frame rate")
    loop: bool = False


class ModelConfig(_Strict):
    bundle: Path = Path("models/default")
    runtime: Literal["auto", "onnxruntime", "torch"] = "auto"
    role: Literal["onnx_int8", "onnx_fp32"] = "onnx_int8"
    providers: list[str] | None = Field(None, description="ONNX Runtime providers in order; default: best available")
    conf: float | None = Field(None, ge=0, le=1, description="default: the bundle's operating threshold")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per session")
    public_keys: list[Path] | None = Field(None, description="trusted Ed25519 public keys (PEM): when set, the "
                                           "agent runs only a bundle signed by one of them, every file's hash checked")
    workers: int | None = Field(None, ge=1, le=16, description="ONNX Runtime sessions side by side, a batch "
                                "split over them; default 1 (lowest latency per frame)")
    store: Path | None = Field(None, description="bundle store directory: the agent runs its current version "
                               "(seeded from `bundle` on the first start) and takes over-the-air updates the hub "
                               "announces (in split mode too: a bundle without the split parts is refused)")
    update_token_env: str = Field("LINEGUARD_AGENT_TOKEN", min_length=1,
                                  description="environment variable holding the hub API token for downloads")
    update_ca_file: Path | None = Field(None, description="CA bundle for the hub's HTTPS (default: the system's)")
    pinned_version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+$",
                                       description="an admin's pin: this version may replace a newer one")


class BatchingConfig(_Strict):
    latency_slo_ms: float = Field(100.0, gt=0, description="per-frame capture-to-result objective")
    max_batch: int = Field(8, ge=1, le=256)
    max_queue_delay_ms: float = Field(10.0, ge=0)


class SamplingConfig(_Strict):
    defect_conf: float | None = Field(None, ge=0, le=1, description="default: the bundle's operating threshold")
    uncertain_band: tuple[float, float] = (0.05, 0.25)
    negative_rate: float = Field(0.002, ge=0, le=1, description="share of defect-free frames sampled")
    max_per_minute: float = Field(30.0, gt=0, description="per camera")
    jpeg_quality: int = Field(90, ge=30, le=100)

    @field_validator("uncertain_band")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"must be [low, high] with 0 <= low < high <= 1, got {list(v)}")
        return v


class MqttConfig(BrokerSettings):
    """``url``, ``username``, ``password_env``, ``ca_file``, ``keepalive_s`` come from the contract."""

    protocol: Literal["3.1.1", "5"] = "3.1.1"
    password_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    heartbeat_s: float = Field(10.0, gt=0)
    publish_results: bool = True
    max_inflight: int = Field(20, ge=1, le=1000)

    def password(self) -> str | None:
        """The secret, read at start from the file or the environment (never from the YAML)."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {e}") from e
        return super().password()


class OutboxConfig(_Strict):
    path: Path = Path("var/outbox.sqlite3")
    quota_mb: float = Field(1024.0, gt=0)


class MetricsConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics; 0 disables it")


class SplitConfig(_Strict):
    """Split inference (issue 5): the bundle's edge part here, the head at the hub's head service."""

    mode: Literal["full", "split", "auto"] = Field(
        "full", description="full: the whole model here; split: edge part only, frames without a hub answer "
        "are undecided; auto: split, falling back on the local full model when the hub does not answer")
    deadline_ms: float = Field(250.0, gt=0, le=10_000, description="wait this long for the hub's answer")
    fallback_after: int = Field(3, ge=1, description="auto: batches in a row with a miss before running locally")
    probe_interval_s: float = Field(2.0, gt=0, description="auto, while local: ask the hub this often")


class AgentConfig(_Strict):
    identity: IdentityConfig = IdentityConfig()
    cameras: list[CameraConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    split: SplitConfig = SplitConfig()
    sampling: SamplingConfig = SamplingConfig()
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _unique_cameras(self) -> AgentConfig:
        ids = [c.id for c in self.cameras]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"camera ids must be unique; repeated: {dup}")
        return self


def build_config(data: dict[str, Any], origin: str = "config") -> AgentConfig:
    """Validate a parsed mapping; :class:`ConfigError` lists every bad key with its dotted path."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid configuration:\n{describe_validation_error(e)}") from None


def load_config(path: Path | str | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (YAML; ``None`` means an empty file) and apply ``overrides`` (dotted keys)."""
    data: dict[str, Any] = {}
    origin = str(path) if path is not None else "command line"
    if path is not None:
        try:
            data = read_yaml_mapping(path)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{origin}: {key} must be a mapping to set {dotted}")
            node = child
        node[leaf] = value
    return build_config(data, origin)
