"""The hub's HTTP side: REST API under ``/api/v1`` and the server-rendered UI."""

from hub.api.app import create_app
from hub.api.context import HubContext

__all__ = ["HubContext", "create_app"]
