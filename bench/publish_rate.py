"""1:1 message throughput: one client publishes as fast as it can, one subscriber reads.

    ./run bench publish_rate [--messages 50000]

Measures messages/s from the first publish to the subscriber's last message for: one
node with the local broker, one node with the Redis broker, and two nodes sharing
Redis (publisher on node 1, subscriber on node 2). This is the broker's own cost per
message: no fan-out. Writes bench/results/publish_rate.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from _common import Server, machine, save, server, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support.redisfix import RedisServer

LINE = b'{"op":"pub","channel":"rate","data":{"n":1}}\n'


def _client(host: str, port: int) -> tuple[socket.socket, Any]:
    sock = socket.create_connection((host, port), timeout=60)
    reader = sock.makefile("rb")
    reader.readline()  # welcome
    return sock, reader


def rate(publish_to: Server, read_from: Server, n: int) -> float:
    sub, reader = _client(read_from.info["services"]["chat"]["host"], read_from.port)
    sub.sendall(b'{"op":"sub","channel":"rate","id":1}\n')
    reader.readline()
    pub, _ = _client(publish_to.info["services"]["chat"]["host"], publish_to.port)
    start = time.perf_counter()

    def pump() -> None:
        for _ in range(0, n, 100):
            pub.sendall(LINE * 100)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    for _ in range(n):
        reader.readline()
    seconds = time.perf_counter() - start
    thread.join()
    sub.close()
    pub.close()
    return round(n / seconds)


# The publisher is a client that floods on purpose (clients may not publish by default).
NO_RATE = ("--max-messages-per-second", "0", "--publish", "all")


@contextlib.contextmanager
def nodes(count: int, *flags: str) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        out = [
            stack.enter_context(
                server("--workers", "1", "--host", f"127.0.0.{2 + i}", *NO_RATE, *flags)
            )
            for i in range(count)
        ]
        for node in out:
            wait_until(lambda n=node: n.stats()["broker"]["status"] == "ok", 30, "broker ok")
        yield out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    n = args.messages
    result: dict[str, object] = {"machine": machine(), "messages": n, "workers_per_node": 1}
    with nodes(1) as (node,):
        result["local_1_node"] = [rate(node, node, n) for _ in range(args.runs)]
    with RedisServer() as redis:
        with nodes(1, "--broker", redis.url) as (node,):
            result["redis_1_node"] = [rate(node, node, n) for _ in range(args.runs)]
        with nodes(2, "--broker", redis.url) as (a, b):
            result["redis_2_nodes"] = [rate(a, b, n) for _ in range(args.runs)]
    print(json.dumps(result, indent=1))
    print(f"saved {save('publish_rate', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
