"""LineGuard hub: ingest, review UI, retraining and rollout (being built)."""

__all__: list[str] = []
