"""One sentence per error the load generator can meet, so every count is explained."""

from __future__ import annotations

import errno

EXPLAIN: dict[str, str] = {
    "EADDRNOTAVAIL": "a (source IP, target) 4-tuple ran out of ephemeral ports: "
    "add source IPs (--source-ips) or target ports, or widen ip_local_port_range",
    "EADDRINUSE": "the source address and port are taken: add source IPs",
    "EMFILE": "a load process reached its fd limit: use more --processes or raise RLIMIT_NOFILE",
    "ENFILE": "the system-wide file table is full: raise fs.file-max",
    "ECONNREFUSED": "nothing is listening on the target, or its listen backlog is full",
    "ETIMEDOUT": "the connect did not complete in time: the server is overloaded or its "
    "SYN backlog (net.ipv4.tcp_max_syn_backlog, somaxconn) overflowed",
    "ECONNRESET": "the server reset the connection (killed worker, full backlog, or abort)",
    "EPIPE": "wrote to a connection the server had already closed",
    "ENOBUFS": "the kernel ran out of socket buffer memory (tcp_mem)",
    "ENOMEM": "the kernel ran out of memory for sockets",
    "server_full": "the server answered server_full: it is at max_connections or a "
    "worker is at its fd limit",
    "no_answer": "connected, but the server did not answer the hello (or finish the TLS "
    "handshake) within --connect-timeout: it stopped accepting and the connection waited in "
    "its listen backlog, or it is too busy to answer (a manydoors node's /api/stats shows "
    "each worker's loop_lag_max_ms and sync_wait_max_ms: the worker, or its broker)",
    "closed_by_server": "the server closed the connection (or sent a WebSocket close) "
    "while it was held",
    "closed": "--reconnect: the connection ended on our side after a refusal (a WebSocket "
    "upgrade answered in HTTP: see its count under errors)",
    "bad_line": "the server sent a line that is not a JSON event",
    "tls_failed": "the TLS handshake or session failed: is the target a TLS service? "
    "(--tls against a plain port fails so)",
    "upgrade refused": "the server answered the WebSocket upgrade with this HTTP status: "
    "is the target a websocket (or, with --pusher, a pusher) service?",
    "pusher": "the server sent pusher:error with this code (4000-4099: do not reconnect, "
    "e.g. 4001 no app with this --app-key; 4100-4199: over capacity, back off; "
    "4200-4299: reconnect)",
    "subscription_error": "the server refused the pusher:subscribe (401/403: a private "
    "channel's auth is wrong: is --app-secret the app's secret?)",
}


def errno_name(exc: BaseException) -> str:
    """How an error is counted: its errno's name (ECONNRESET), else its type's."""
    if isinstance(exc, TimeoutError):
        return "ETIMEDOUT"
    code = getattr(exc, "errno", None)
    if code:
        return errno.errorcode.get(code, f"errno {code}")
    return type(exc).__name__


def explain(name: str) -> str:
    # "tls_failed: WRONG_VERSION_NUMBER" is explained as "tls_failed"
    # ... and "pusher 4001: ..." as "pusher"
    head = name.split(":", 1)[0]
    known = EXPLAIN.get(name) or EXPLAIN.get(head) or EXPLAIN.get(head.split(" ", 1)[0])
    return known or ("see errno(3)" if name.startswith("E") else "server error code")
