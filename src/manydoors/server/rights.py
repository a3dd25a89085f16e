"""What a client may do with a channel: the namespace's rights, and its token's grants.

Each answer is ``None`` (allowed) or the reason of a ``forbidden`` error. The namespace
comes from the shared resolver (cached per channel); the only per-connection state is
the grant of a token-holding connection (the channels its JWT, or the connect proxy's
answer, lists), kept here in a dict rather than in a slot of every connection.
"""

from __future__ import annotations

from ..config import NamespaceConfig
from ..namespaces import Namespaces
from ..protocol.messages import PRIVATE
from .hub import channels_of
from .peer import Peer


def _where(name: str) -> str:
    return f"namespace {name}" if name else "the default namespace"


class Rights:
    """Rights of one worker's connections."""

    __slots__ = ("allow_send", "grants", "namespaces", "tokens")

    def __init__(self, namespaces: Namespaces, allow_send: bool, tokens: bool) -> None:
        self.namespaces = namespaces
        self.allow_send = allow_send
        self.tokens = tokens  # auth mode "token" or "proxy": grants exist
        # The channels each connection's JWT (or connect proxy answer) lists (only those).
        self.grants: dict[Peer, frozenset[str]] = {}

    def _ungranted(self, conn: Peer, channel: str, what: str) -> str | None:
        if channel in self.grants.get(conn, ()):
            return None
        how = "a token granting it" if self.tokens else "auth mode token"
        return f"channel {channel} {what}: it needs {how}"

    def subscribe(self, conn: Peer, channel: str) -> str | None:
        if channel.startswith(PRIVATE):
            return self._ungranted(conn, channel, "is private")
        ns = self.namespaces(channel)
        if ns.subscribe == "token":
            return self._ungranted(conn, channel, f"is in {_where(ns.name)} (subscribe = token)")
        return None

    def publish(self, conn: Peer, channel: str, ns: NamespaceConfig | None = None) -> str | None:
        """``ns``: the channel's namespace when the caller has it already (once a pub)."""
        if channel.startswith(PRIVATE):
            return self._ungranted(conn, channel, "is private")
        if ns is None:
            ns = self.namespaces(channel)
        if ns.publish == "all":
            return None
        if ns.publish == "subscribers":
            if channel in channels_of(conn):
                return None
            return f"only subscribers of {channel} may publish to it ({_where(ns.name)})"
        return f"clients may not publish in {_where(ns.name)} (publish = none)"

    def presence(self, conn: Peer, channel: str) -> str | None:
        why = self.subscribe(conn, channel)  # whoever may not join may not look in
        if why is not None:
            return why
        ns = self.namespaces(channel)
        if ns.subscribe == "proxy" and channel not in channels_of(conn):
            # Only the backend knows who may join: those it let in may look.
            return f"channel {channel} is in {_where(ns.name)} (subscribe = proxy): subscribe first"
        return None if ns.presence else f"presence is off in {_where(ns.name)}"

    def send(self) -> str | None:
        return None if self.allow_send else "clients may not send to users here (allow_send)"
