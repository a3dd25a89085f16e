"""The real-Redis fixtures work: a standalone server that survives a crash, and a cluster."""

from __future__ import annotations

from support.redisfix import RedisCluster, RedisServer


def test_standalone_server_sets_and_gets(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        assert client.set("md:test", b"hello")
        assert client.get("md:test") == b"hello"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"


def test_killed_server_restarts_on_the_same_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    with redis_server.client() as client:
        client.set("before", 1)
        redis_server.kill()
        assert not redis_server.running()
        redis_server.start()
        assert redis_server.port == port
        assert redis_server.pid != pid
        # Nothing is persisted, so the crash lost the key; the same client reconnects.
        assert client.get("before") is None
        client.set("after", 2)
        assert client.get("after") == b"2"


def test_cluster_spreads_keys_over_slots(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.ports) == 3
    with redis_cluster.client() as client:
        keys = [f"key:{n}" for n in range(30)]
        for n, key in enumerate(keys):
            client.set(key, n)
        assert [int(client.get(key)) for key in keys] == list(range(30))
        owners = {client.get_node_from_key(key).port for key in keys}
        assert owners == set(redis_cluster.ports)
        for node in client.get_primaries():
            info = client.cluster_info(target_nodes=node)
            assert info["cluster_state"] == "ok"


def test_cluster_url_reaches_a_cluster_client(redis_cluster: RedisCluster) -> None:
    client = redis_cluster.client()
    try:
        assert client.ping()
        assert client.keyslot("md:seq:{veg}") == client.keyslot("md:h:{veg}")
    finally:
        client.close()
