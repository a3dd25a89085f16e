"""The client side of TLS for the load generator: ciphertext in, plaintext out.

The agent drives raw sockets with reader callbacks, not transports, so TLS runs over
memory buffers here (OpenSSL never touches the socket): the agent feeds what it
reads and sends what comes back. The certificate is not verified: the load generator
aims at a server of its own, usually on loopback with a self-signed certificate, and
measures it; it carries nothing that needs protecting.
"""

from __future__ import annotations

import ssl
from typing import Final

READ_SIZE: Final = 256 * 1024


def client_context() -> ssl.SSLContext:
    """A TLS 1.2+ client context that accepts any certificate (see the module doc)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsPipe:
    """One client TLS session over memory BIOs.

    ``start()`` gives the ClientHello; ``receive(ciphertext)`` gives the plaintext
    that completes (none until ``done``), after which ``pending()`` holds what must be
    sent back (handshake messages); ``wrap(plaintext)`` gives the ciphertext to send.
    ``closed`` turns true when the server's close_notify arrives.
    """

    __slots__ = ("closed", "done", "incoming", "obj", "outgoing")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.done = False
        self.closed = False

    def start(self) -> bytes:
        self._handshake()
        return self.outgoing.read()

    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.done = True

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext from the socket; return the plaintext it completes.

        Raises ssl.SSLError when the server breaks the protocol (or the handshake fails).
        """
        self.incoming.write(data)
        if not self.done:
            self._handshake()
            if not self.done:
                return b""
        chunks = []
        while True:
            try:
                chunk = self.obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def pending(self) -> bytes:
        return self.outgoing.read()

    def wrap(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()
