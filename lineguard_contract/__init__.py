"""The MQTT contract between edge agents and the hub: topics and versioned payloads.

This package is the only place topic strings are written. Both sides import it.
"""

from lineguard_contract.topics import CONTRACT_VERSION, Topics

__all__ = ["CONTRACT_VERSION", "Topics"]
