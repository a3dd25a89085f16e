"""What one idle server-side TLS session costs in OpenSSL alone, without any socket.

    ./run bench tls_floor [--sessions 5000]

Completes handshakes between server and client ``ssl.SSLObject``s over memory BIOs
in one process (the server context is manydoors' own, from server/tls.py), passes one
small message each way, keeps only the server side, and divides the RSS growth by
the sessions kept. This is the floor under ``./run bench memory --tls``: what is left
above it is uvloop's SSLProtocol. Writes bench/results/tls_floor.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import ssl
import sys
import tempfile

from _common import machine, save, self_signed
from manydoors.loadgen.tlspipe import client_context
from manydoors.node import procfs
from manydoors.server.tls import server_context

Session = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


def pair(server: ssl.SSLContext, client: ssl.SSLContext) -> Session:
    """A handshaken server session (its client is dropped)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out)
    for _ in range(10):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    c.write(b'{"op":"hello","user":"u1","id":1}\n')
    s_in.write(c_out.read())
    s.read(1024)
    s.write(b'{"ev":"ok","id":1}\n')
    c_in.write(s_out.read())
    c.read(1024)
    return s, s_in, s_out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=5000)
    args = p.parse_args()
    cert, key = self_signed(tempfile.mkdtemp(prefix="manydoors-bench-"))
    server, client = server_context(cert, key), client_context()
    for _ in range(200):  # warm up allocator pools and OpenSSL's caches
        pair(server, client)
    gc.collect()
    before = procfs.rss() or 0
    kept = [pair(server, client) for _ in range(args.sessions)]
    gc.collect()
    growth = (procfs.rss() or 0) - before
    result = {
        "machine": machine(),
        "openssl": ssl.OPENSSL_VERSION,
        "version": kept[0][0].version(),
        "cipher": (kept[0][0].cipher() or ("?",))[0],
        "sessions": len(kept),
        "per_session_bytes": round(growth / len(kept), 1),
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save('tls_floor', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
