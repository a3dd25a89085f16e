"""How Pusher apps' channels and users live among the node's (no I/O).

The node routes by channel and user name. An app's channel ``private-chat`` is the
node's ``\\x1f1001:private-chat`` (app id 1001): a native client cannot name it (a
native name has no control character), and no two apps share one. Users signed in with
``pusher:signin`` are named the same way, so the API's ``terminate_connections`` and
events to a user reach that app's connections only.

Each kind of Pusher channel gets its namespace here, resolved once per channel like
any other (``namespaces.py``): presence channels tell joins and leaves, cache channels
keep their last event (history of one), the others keep none.
"""

from __future__ import annotations

import re
from typing import Final

from ..config import NamespaceConfig

MARK: Final = "\x1f"  # starts every node name of an app's channel or user
MAX_CHANNEL: Final = 164  # Pusher's limit on a channel name's length
CACHE_TTL: Final = 1800.0  # seconds a cache channel keeps its last event (Pusher: 30 min)
SERVER_TO_USER: Final = "#server-to-user-"  # the channel pusher-js joins after a signin

_VALID: Final = re.compile(r"[A-Za-z0-9_\-=@,.;]+\Z")
_USER_CHANNEL: Final = re.compile(r"#server-to-user-[A-Za-z0-9_\-=@,.;]+\Z")

PLAIN: Final = NamespaceConfig(name="pusher", history_size=0, history_ttl=CACHE_TTL)
PRESENCE: Final = NamespaceConfig(
    name="pusher", history_size=0, history_ttl=CACHE_TTL, join_leave=True
)
CACHE: Final = NamespaceConfig(name="pusher", history_size=1, history_ttl=CACHE_TTL)
PRESENCE_CACHE: Final = NamespaceConfig(
    name="pusher", history_size=1, history_ttl=CACHE_TTL, join_leave=True
)


def channel(app_id: str, name: str) -> str:
    """The node's name of ``name`` in app ``app_id``."""
    return f"{MARK}{app_id}:{name}"


def user(app_id: str, user_id: str) -> str:
    """The node's name of a user signed in to app ``app_id``."""
    return f"{MARK}{app_id}:{user_id}"


def split(node_name: str) -> tuple[str, str] | None:
    """(app id, the app's name) of a node name, or None for a native one."""
    if not node_name.startswith(MARK):
        return None
    app_id, colon, name = node_name[1:].partition(":")
    return (app_id, name) if colon else None


def outer(node_name: str) -> str:
    """The app's own name of a node channel or user name."""
    return node_name[node_name.index(":") + 1 :]


def valid(name: str) -> bool:
    """A channel name Pusher accepts (and ``#server-to-user-<id>``)."""
    if not name or len(name) > MAX_CHANNEL:
        return False
    return bool(_VALID.match(name) or _USER_CHANNEL.match(name))


def is_presence(name: str) -> bool:
    return name.startswith("presence-")


def is_private(name: str) -> bool:
    """Private, encrypted and presence channels: subscribing needs an auth signature."""
    return name.startswith(("private-", "presence-"))


def is_encrypted(name: str) -> bool:
    return name.startswith("private-encrypted-")


def is_cache(name: str) -> bool:
    return name.startswith(
        ("cache-", "private-cache-", "presence-cache-", "private-encrypted-cache-")
    )


def namespace(node_name: str) -> NamespaceConfig:
    """The namespace of an app's channel (its node name), by the channel's kind."""
    name = outer(node_name) if ":" in node_name else node_name
    if is_presence(name):
        return PRESENCE_CACHE if is_cache(name) else PRESENCE
    return CACHE if is_cache(name) else PLAIN
