"""TLS for a service: the server's SSLContext from PEM files, and what a worker needs.

uvloop does the TLS itself: ``create_server(ssl=...)`` wraps each connection's
protocol in its SSLProtocol (OpenSSL through memory BIOs), so the connection code
above it is the same with or without TLS. The supervisor loads the files once at
start-up so that a bad file stops the node with a message naming it before any worker
starts; each worker then builds its own context from the same files (an SSLContext
cannot be pickled to a forked worker), so a restarted worker picks up renewed files.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import TYPE_CHECKING, Any, Final

from ..config import ServiceConfig
from .connection import Connection, TcpConnection, WsConnection

# Used when read_timeout is 0 (off): a handshake that never ends would hold an fd.
HANDSHAKE_TIMEOUT: Final = 10.0
# Seconds to wait for the peer's close_notify after ours; the fd is held meanwhile.
SHUTDOWN_TIMEOUT: Final = 5.0
_CERT: Final = b"-----BEGIN CERTIFICATE-----"
_KEY: Final = re.compile(rb"-----BEGIN (?:RSA |EC |DSA )?PRIVATE KEY-----")
_ENCRYPTED: Final = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class TlsError(Exception):
    """A certificate or key file cannot be used; the message names the file and why."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``cert`` (PEM, with its chain) and ``key``.

    Raises TlsError naming the file: missing or unreadable, not PEM, an encrypted key
    (there is nobody to type a passphrase), or a key that is not the certificate's.
    """
    # OpenSSL only says "PEM lib" for every kind of bad file: look first, to say which.
    if _CERT not in _read(cert, "certificate"):
        raise TlsError(f"the certificate {cert} holds no PEM certificate ({_CERT.decode()})")
    key_pem = _read(key, "private key")
    if any(mark in key_pem for mark in _ENCRYPTED):
        raise TlsError(f"the private key {key} is encrypted: give an unencrypted key")
    if not _KEY.search(key_pem):
        raise TlsError(f"the private key {key} holds no PEM private key")

    def no_password() -> str:
        raise TlsError(f"the private key {key} is encrypted: give an unencrypted key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # Python's defaults: AEAD ciphers, no compression
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a client could make us redo handshakes
    # Each worker has its own ticket key (a context cannot be shared across processes),
    # and SO_REUSEPORT sends a reconnect to any worker, so a TLS 1.3 ticket would
    # rarely find the key that opens it: do not spend a write per handshake on them.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the private key {key} does not match the certificate {cert}") from None
        raise TlsError(f"the certificate {cert} or the key {key}: {exc.reason or exc}") from None
    except OSError as exc:  # removed since we read it
        raise TlsError(f"cannot read {exc.filename or cert}: {exc.strerror}") from None
    return ctx


def listen_options(service: ServiceConfig) -> dict[str, Any]:
    """``loop.create_server`` arguments for the service's TLS (none without tls_cert)."""
    if service.tls_cert is None or service.tls_key is None:
        return {}
    return {
        "ssl": server_context(service.tls_cert, service.tls_key),
        "ssl_handshake_timeout": service.read_timeout or HANDSHAKE_TIMEOUT,
        "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT,
    }


class _Handshaken(Connection):
    """Gives back the admission of a connection whose TLS handshake fails.

    The worker counts a connection when uvloop asks for its protocol, before the
    handshake; uvloop's SSLProtocol calls connection_made only once the handshake is
    done, and neither it nor connection_lost when it fails (a plain-text client, a
    timeout, a reset): it just drops the protocol object. So the object itself must
    notice, when it is freed without ever having been made.
    """

    if not TYPE_CHECKING:
        __slots__ = ()  # as in Connection: the subclasses declare the slot
    made: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        super().connection_made(transport)

    def __del__(self) -> None:
        if not self.made:
            self.admission.unaccept()


class TlsTcpConnection(_Handshaken, TcpConnection):
    __slots__ = ("made",)

    def __init__(self) -> None:
        super().__init__()
        self.made = False


class TlsWsConnection(_Handshaken, WsConnection):
    __slots__ = ("made",)

    def __init__(self) -> None:
        super().__init__()
        self.made = False


def connection_class(service: ServiceConfig) -> type[Connection]:
    """The connection class of the service's protocol, with or without TLS."""
    websocket = service.protocol == "websocket"
    if service.tls_cert is None:
        return WsConnection if websocket else TcpConnection
    return TlsWsConnection if websocket else TlsTcpConnection
