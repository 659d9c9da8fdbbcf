"""The hub's foundations: configuration and database access."""

from hub.core.config import ConfigError, HubConfig, HubMqttConfig, build_config, load_config
from hub.core.db import make_engine, make_session_factory, normalize_url, upgrade

__all__ = [
    "ConfigError",
    "HubConfig",
    "HubMqttConfig",
    "build_config",
    "load_config",
    "make_engine",
    "make_session_factory",
    "normalize_url",
    "upgrade",
]
