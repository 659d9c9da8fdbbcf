"""How either side reaches the broker: the settings an agent and a hub worker share.

``BrokerSettings`` is the common part of both processes' ``mqtt`` config section (each adds its
own keys by subclassing); :func:`describe_validation_error` turns a pydantic error into lines
that name each bad key by its dotted path, the same way for every LineGuard process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["BrokerSettings", "describe_validation_error", "read_yaml_mapping"]


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port (TLS)")
    username: str | None = None
    password_env: str = Field("LINEGUARD_MQTT_PASSWORD", min_length=1,
                              description="environment variable holding the password")
    ca_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"must look like mqtt://host:port or mqtts://host:port, got {v!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError(f"bad port in {v!r}") from e
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        p = urlsplit(self.url)
        return p.port or (8883 if p.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.ca_file is not None

    def password(self) -> str | None:
        """The secret, read at start from the environment (never from a config file)."""
        return os.environ.get(self.password_env)


def describe_validation_error(e: ValidationError) -> str:
    """One line per problem: ``  dotted.key: message`` (``unknown key`` for a typo)."""
    lines = []
    for err in e.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path | str) -> dict[str, Any]:
    """A YAML config file's top-level mapping (an empty file is ``{}``). ValueError, naming the
    file and what is wrong with it, otherwise; both processes' config loaders wrap it in their
    ``ConfigError``."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded
