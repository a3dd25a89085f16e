"""What the broker costs per connected user: in the supervisor, and in Redis.

    ./run bench broker_memory [--connections 20000]

For the local and the Redis broker in turn, starts a node, opens the connections
(each says hello as its own user and subscribes to one channel), and divides the
growth of the supervisor's RSS (its broker tables) and of Redis's ``used_memory``
(one user topic subscription per user) by the connections held.
Writes bench/results/broker_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _common import load, machine, rss_pss, save, server, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support.redisfix import RedisServer


def measure(n: int, broker: list[str], redis: RedisServer | None) -> dict[str, float]:
    with server("--workers", "2", "--max-connections", str(n), *broker) as srv:
        sup = srv.info["pid"]
        wait_until(lambda: srv.stats()["broker"]["status"] == "ok", 30, "broker ok")
        redis_before = _used(redis)
        sup_before = rss_pss(sup)[0]
        gen = load(*srv.target(n, 10_000), "--subscribe", "veg", "--hold", "60")
        try:
            wait_until(lambda: srv.stats()["messages_in"] >= 2 * n, 180, "all subscribed")
            held = srv.stats()["connections"]
            sup_after = rss_pss(sup)[0]
            redis_after = _used(redis)
        finally:
            gen.terminate()
            gen.wait()
    out = {"connections": held, "supervisor_bytes_per_user": (sup_after - sup_before) / held}
    if redis is not None:
        out["redis_bytes_per_user"] = (redis_after - redis_before) / held
    return {k: round(v, 1) for k, v in out.items()}


def _used(redis: RedisServer | None) -> int:
    if redis is None:
        return 0
    with redis.client() as r:
        return int(r.info("memory")["used_memory"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=20_000)
    args = p.parse_args()
    result: dict[str, object] = {"machine": machine()}
    result["local"] = measure(args.connections, [], None)
    with RedisServer() as redis:
        result["redis"] = measure(args.connections, ["--broker", redis.url], redis)
    print(json.dumps(result, indent=1))
    print(f"saved {save('broker_memory', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
