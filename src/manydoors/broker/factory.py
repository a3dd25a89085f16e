"""Build the node's broker from the config: a router over the backplane it names."""

from __future__ import annotations

from ..config import Config
from ..namespaces import Namespaces
from .backplane import Backplane, LocalBackplane
from .router import Router


def make_broker(config: Config) -> Router:
    """The broker ``config`` asks for: alone (local) or shared through Redis."""
    backplane: Backplane
    # Each channel's history size and TTL are its namespace's.
    limits = Namespaces.of_config(config).history
    if config.broker == "redis":
        from .redis import RedisBackplane  # redis-py stays out of local nodes

        backplane = RedisBackplane(
            config.redis_url, config.history_size, config.history_ttl, limits
        )
    else:
        backplane = LocalBackplane(config.history_size, config.history_ttl, limits)
    return Router(backplane)
