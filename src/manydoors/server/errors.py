"""Why a node cannot start.

Its own module so that whoever reports a start-up failure (the supervisor, the pools,
the API, the command line) imports it without importing the supervisor.
"""

from __future__ import annotations


class StartupError(Exception):
    """The node cannot start (port in use, bad address); the message says why."""
