"""Which namespace a channel belongs to: its rights and options (no I/O).

``news:sports`` belongs to the namespace ``news`` when one is configured, else (like
every channel without ``:``) to the default namespace, ``[channels]``. Policy is data:
a channel's namespace is resolved once and cached, never per message, and nothing is
stored on a connection. The workers (rights) and the broker (history per namespace)
share this resolver.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Final

from .config import Config, NamespaceConfig
from .pusher import names as pusher_names

# Channels whose namespace is remembered; past it the cache starts afresh (a lookup
# is a split and a dict get, so a miss costs little; a bound keeps a million one-off
# channels from holding memory here).
CACHE_MAX: Final = 65_536


class Namespaces:
    """Resolve a channel to its NamespaceConfig (history options filled in)."""

    __slots__ = ("by_name", "cache", "default")

    def __init__(
        self,
        default: NamespaceConfig,
        namespaces: Iterable[NamespaceConfig] = (),
        history_size: int = 100,
        history_ttl: float = 300.0,
    ) -> None:
        def filled(ns: NamespaceConfig) -> NamespaceConfig:
            return replace(
                ns,
                history_size=history_size if ns.history_size is None else ns.history_size,
                history_ttl=history_ttl if ns.history_ttl is None else ns.history_ttl,
            )

        self.default = filled(default)
        self.by_name = {ns.name: filled(ns) for ns in namespaces}
        self.cache: dict[str, NamespaceConfig] = {}

    @classmethod
    def of_config(cls, config: Config) -> Namespaces:
        return cls(config.channels, config.namespaces, config.history_size, config.history_ttl)

    def __call__(self, channel: str) -> NamespaceConfig:
        ns = self.cache.get(channel)
        if ns is None:
            head, colon, _ = channel.partition(":")
            if head.startswith(pusher_names.MARK):  # a Pusher app's: by its kind
                ns = pusher_names.namespace(channel)
            else:
                ns = self.by_name.get(head, self.default) if colon else self.default
            if len(self.cache) >= CACHE_MAX:
                self.cache.clear()
            self.cache[channel] = ns
        return ns

    def history(self, channel: str) -> tuple[int, float]:
        """(size, ttl) of the channel's history."""
        ns = self(channel)
        return ns.history_size or 0, ns.history_ttl or 0.0

    def all(self) -> tuple[NamespaceConfig, ...]:
        return (self.default, *self.by_name.values())
