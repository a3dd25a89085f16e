"""End-to-end: a real supervisor, real worker processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time

from support.client import Client
from support.server import small, spread
from support.wait import wait_for


def is_msg(channel: str, data: object) -> object:
    return lambda e: e.get("ev") == "msg" and e["channel"] == channel and e["data"] == data


def test_channel_message_reaches_every_subscriber_once_across_workers(serve, clients):
    server = serve("--workers", "2", "--max-connections", "1000")
    port = server.port()
    groups = spread(clients, port, per_worker=3, workers=2)
    subscribers = [c for g in groups.values() for c in g[:2]]
    others = [g[2] for g in groups.values()]
    for i, c in enumerate(subscribers):
        assert c.call({"op": "hello", "user": f"s{i}", "id": 1})["ev"] == "ok"
        assert c.call({"op": "sub", "channel": "veg", "id": 2})["ev"] == "ok"

    # From the API ...
    assert server.publish(channel="veg", data={"n": 1})["workers"] == 2
    # ... and from a client (who is not subscribed itself).
    others[0].send({"op": "pub", "channel": "veg", "data": {"n": 2}, "id": 9})
    assert others[0].recv() == {"ev": "ok", "id": 9}
    # A marker on the same path as the last publish (same client, same worker link, so
    # it reaches the broker after it): anything duplicated would come before it.
    others[0].send({"op": "pub", "channel": "veg", "data": "end"})

    for c in subscribers:
        events = c.until(is_msg("veg", "end"))
        assert [e["data"] for e in events] == [{"n": 1}, {"n": 2}, "end"], events
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        assert events[1]["from"] is None  # the publisher never said hello
    # Non-subscribers get nothing of "veg": the broadcast is the first thing they see.
    server.publish(broadcast=True, data="all")
    for c in others:
        assert c.until(lambda e: e.get("ev") != "ok") == [
            {"ev": "broadcast", "seq": 1, "from": None, "data": "all"}
        ]


def test_send_reaches_user_with_connections_on_two_workers(serve, clients):
    server = serve("--workers", "2", "--max-connections", "1000")
    groups = spread(clients, server.port(), per_worker=1, workers=2)
    bob1, bob2 = (g[0] for g in groups.values())
    assert bob1.worker != bob2.worker
    for bob in (bob1, bob2):
        assert bob.call({"op": "hello", "user": "bob", "id": 1})["ev"] == "ok"
    alice = clients(server.port())
    alice.call({"op": "hello", "user": "alice", "id": 1})
    alice.send({"op": "send", "user": "bob", "data": "hi bob"})
    server.publish(user="bob", data="from api")
    # The two travel different paths to the broker (alice's worker, the API), so
    # their order is not defined; each must arrive exactly once.
    for bob in (bob1, bob2):
        got = sorted([bob.recv(), bob.recv()], key=lambda e: str(e["data"]))
        assert got == [
            {"ev": "dm", "from": None, "data": "from api"},
            {"ev": "dm", "from": "alice", "data": "hi bob"},
        ]
    # alice sent to bob, not to herself
    alice.send({"op": "ping", "id": 5})
    assert alice.recv() == {"ev": "pong", "id": 5}


def test_killed_worker_is_restarted_and_other_clients_never_notice(serve, clients):
    server = serve("--workers", "2", "--max-connections", "1000")
    groups = spread(clients, server.port(), per_worker=1, workers=2)
    (slot_a, (survivor,)), (slot_b, (victim,)) = sorted(groups.items())
    for c in (survivor, victim):
        c.call({"op": "sub", "channel": "news", "id": 1})
    pids = server.worker_pids()
    os.kill(pids[slot_b], signal.SIGKILL)
    assert victim.closed()
    new_pid = wait_for(
        lambda: (p := server.worker_pids()[slot_b]) not in (None, pids[slot_b]) and p,
        what="restart",
    )
    assert server.worker_pids()[slot_a] == pids[slot_a]
    server.publish(channel="news", data="still here")
    assert survivor.recv()["data"] == "still here"
    survivor.send({"op": "ping"})
    assert survivor.recv() == {"ev": "pong"}
    assert f"(pid {pids[slot_b]}) exited" in server.output()
    # The restarted worker accepts on the same slot socket again.
    wait_for(lambda: os.path.exists(f"/proc/{new_pid}"), what="new worker")
    spread(clients, server.port(), per_worker=1, workers=2)
    stats = server.stats()
    assert stats["services"][0]["workers"][slot_b]["restarts"] == 1


def test_sigterm_drains_every_client_with_bye(serve, clients):
    server = serve("--workers", "2", "--max-connections", "1000", "--drain-timeout", "5")
    groups = spread(clients, server.port(), per_worker=2, workers=2)
    everyone = [c for g in groups.values() for c in g]
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for c in everyone:
        assert c.recv() == {"ev": "bye", "reason": "shutdown"}
        assert c.closed()
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert "stopped" in server.output()


def test_each_kind_of_bad_input_gets_its_error_code(serve, clients):
    server = serve("--workers", "1", "--max-connections", "100", "--max-message-bytes", "100")
    c = clients(server.port())
    bystander = clients(server.port())
    bystander.call({"op": "sub", "channel": "x", "id": 1})
    cases = [
        (b"not json\n", "bad_json"),
        (b"\xff\xfe\n", "bad_json"),
        (b"[1,2]\n", "not_object"),
        (b'{"op":"dance","id":3}\n', "unknown_op"),
        (b'{"channel":"x"}\n', "missing_field"),
        (b'{"op":"sub","id":4}\n', "missing_field"),
        (b'{"op":"sub","channel":42,"id":5}\n', "bad_field"),
        (b'{"op":"pub","channel":"x","data":"' + b"a" * 200 + b'"}\n', "too_long"),
    ]
    for line, code in cases:
        c.send(line)
        event = c.recv()
        assert event["ev"] == "error" and event["code"] == code, (line, event)
        assert event["reason"]
    c.send(b'{"op":"sub","channel":42,"id":7}\n')
    assert c.recv()["id"] == 7  # the id survives a bad field
    # A good line resets the strike count; the connection still works.
    c.send({"op": "ping"})
    assert c.recv() == {"ev": "pong"}
    # Ten bad lines in a row: bye and close.
    c.send(b"x\n" * 10)
    events = c.until(lambda e: e["ev"] == "bye")
    assert events[-1] == {"ev": "bye", "reason": "bad_input"}
    assert len(events) == 11
    assert c.closed()
    # Nobody else noticed.
    server.publish(channel="x", data=1)
    assert bystander.recv()["data"] == 1
    stats = wait_for(lambda: (s := server.stats())["closed"]["bad_input"] == 1 and s)
    assert stats["errors"]["bad_json"] == 12
    assert stats["errors"]["too_long"] == 1
    assert stats["errors"]["bad_field"] == 2


def test_full_service_refuses_with_server_full_and_stays_up(serve, clients):
    # fd limit 100 - reserve 64 = 36 per worker; 50 connections need 2 workers.
    server = serve("--max-connections", "50", "--fd-limit", "100", "--workers", "1")
    assert "2 workers x 36 fds = 72 connections" in server.output()
    port = server.port()
    held: list[Client] = []
    refused = 0
    for _ in range(70):
        c = Client(port, welcome=False)
        first = c.recv()
        if first["ev"] == "welcome":
            held.append(c)
        else:
            assert first["ev"] == "error" and first["code"] == "server_full", first
            assert c.closed()
            c.close()
            refused += 1
    assert len(held) + refused == 70
    assert len(held) <= 50 and refused >= 20
    stats = server.stats()
    assert stats["connections"] == len(held)
    assert sum(stats["refused"].values()) == refused
    # Those held are still served, and the server takes new clients once there is room.
    for c in held[:5]:
        c.send({"op": "ping"})
        assert c.recv() == {"ev": "pong"}
    for c in held:
        c.close()
    wait_for(lambda: server.stats()["connections"] == 0, what="connections closed")
    fresh = clients(port)
    assert fresh.welcome["ev"] == "welcome"
    assert server.http("GET", "/healthz")[0] == 200


def test_worker_out_of_fds_answers_server_full_to_a_burst_and_keeps_serving(serve, clients):
    # fd_reserve 2 would let the worker run into EMFILE; it must measure what is really
    # free, refuse with a message, and never drop a client silently.
    server = serve(
        config="fd_limit = 70\nfd_reserve = 2\n[api]\nport = 0\n"
        '[[service]]\nname = "chat"\nport = 0\nworkers = 1\nmax_connections = 60\n'
    )
    burst = [Client(server.port(), welcome=False) for _ in range(300)]
    answers = {}
    for s in burst:
        first = s.line()
        kind = first[:24]
        answers[kind] = answers.get(kind, 0) + 1
    welcomed = answers.pop(b'{"ev":"welcome","conn":"', 0)
    assert answers == {b'{"ev":"error","code":"se': 300 - welcomed}
    assert 20 < welcomed < 60
    stats = server.stats()
    assert stats["refused"]["worker_full"] == 300 - welcomed
    assert stats["connections"] == welcomed
    for s in burst:
        s.close()
    wait_for(lambda: server.stats()["connections"] == 0, what="all closed")
    c = clients(server.port())
    c.send({"op": "ping"})
    assert c.recv() == {"ev": "pong"}


TWO_SERVICES = """
[api]
port = 0

[[service]]
name = "veg"
port = 0
workers = 1
max_connections = 100

[[service]]
name = "nonveg"
port = 0
workers = 1
max_connections = 100
"""


def test_services_have_their_own_workers_and_share_channels(serve, clients):
    server = serve(config=TWO_SERVICES)
    out = server.output()
    assert "veg 127.0.0.1:" in out and "nonveg 127.0.0.1:" in out
    veg = clients(server.port("veg"))
    nonveg = clients(server.port("nonveg"))
    assert veg.welcome["service"] == "veg" and nonveg.welcome["service"] == "nonveg"
    for c in (veg, nonveg):
        c.call({"op": "sub", "channel": "kitchen", "id": 1})
    veg.send({"op": "pub", "channel": "kitchen", "data": "soup"})
    assert veg.recv()["data"] == "soup"
    assert nonveg.recv()["data"] == "soup"
    # One house's cook dies; the other house never notices.
    os.kill(server.worker_pids("veg")[0], signal.SIGKILL)
    assert veg.closed()
    nonveg.send({"op": "ping"})
    assert nonveg.recv() == {"ev": "pong"}
    wait_for(lambda: server.http("GET", "/healthz")[0] == 200, what="veg restarted")
    again = clients(server.port("veg"))
    again.call({"op": "sub", "channel": "kitchen", "id": 1})
    server.publish(channel="kitchen", data="stew")
    assert again.recv()["data"] == "stew"
    assert nonveg.recv()["data"] == "stew"


def test_api_rejects_bad_publish_bodies_and_serves_metrics(serve):
    server = serve("--workers", "1", "--max-connections", "10")
    for body, code in [
        ({"data": 1}, "bad_target"),
        ({"channel": "a", "user": "b", "data": 1}, "bad_target"),
        ({"channel": "a"}, "bad_field"),
        ({"channel": "a", "data": 1, "colour": "red"}, "bad_field"),
    ]:
        status, answer = server.http("POST", "/api/publish", body)
        assert status == 400 and answer["error"] == code, (body, answer)
    status, text = server.http("GET", "/metrics")
    assert status == 200
    assert 'manydoors_connections{service="chat"} 0.0' in text
    assert "manydoors_refused_total" in text
    assert "manydoors_broker_degraded 0.0" in text
    status, health = server.http("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    stats = server.stats()
    svc = stats["services"][0]
    assert svc["workers"][0]["fd_limit"] > 0 and svc["workers"][0]["rss_bytes"] > 0
    assert set(stats) >= {
        "connections",
        "accepted",
        "refused",
        "messages_in",
        "messages_out",
        "dropped",
        "services",
    }


def test_api_refuses_invalid_utf8_instead_of_relaying_it(serve, clients):
    import urllib.request

    server = serve("--workers", "1", "--max-connections", "10")
    sub = clients(server.port())
    sub.call({"op": "sub", "channel": "x", "id": 1})
    req = urllib.request.Request(
        server.api + "/api/publish", data=b'{"channel":"x","data":"\xff"}', method="POST"
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("accepted invalid UTF-8")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert b"UTF-8" in exc.read()
    server.publish(channel="x", data="fine")
    assert sub.recv()["data"] == "fine"


def test_lines_after_a_bad_input_close_are_not_acted_on(serve, clients):
    server = serve("--workers", "1", "--max-connections", "10")
    watcher = clients(server.port())
    watcher.call({"op": "sub", "channel": "x", "id": 1})
    rogue = clients(server.port())
    rogue.send(b"junk\n" * 10 + b'{"op":"pub","channel":"x","data":"sneaky"}\n' + b"junk\n")
    assert rogue.until(lambda e: e["ev"] == "bye")[-1]["reason"] == "bad_input"
    assert rogue.closed()
    server.publish(channel="x", data="after")
    assert watcher.recv()["data"] == "after"
    assert server.stats()["closed"]["bad_input"] == 1


def test_connections_endpoint_and_top_show_live_connections(serve, clients):
    import subprocess

    from support.server import manydoors_cmd

    server = serve("--workers", "2", "--max-connections", "1000")
    alice = clients(server.port())
    alice.call({"op": "hello", "user": "alice", "id": 1})
    alice.call({"op": "sub", "channel": "veg", "id": 2})
    clients(server.port())
    status, body = server.http("GET", "/api/connections?limit=10")
    assert status == 200
    rows = body["connections"]
    assert len(rows) == 2
    mine = next(r for r in rows if r["user"] == "alice")
    local_port = alice.sock.getsockname()[1]
    assert mine["tuple"] == ["tcp", "127.0.0.1", local_port, "127.0.0.1", server.port()]
    assert mine["channels"] == ["veg"] and mine["service"] == "chat"
    assert server.http("GET", "/api/connections?service=nope")[0] == 404
    out = subprocess.run(
        manydoors_cmd("top", "--api", server.api, "--once"),
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "160", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert f"127.0.0.1:{local_port}" in out.stdout and "alice" in out.stdout
    for pid in server.worker_pids():
        assert str(pid) in out.stdout


def test_a_connection_is_refused_subscriptions_beyond_max_subscriptions(serve, clients):
    server = serve("--workers", "1", "--max-connections", "10", "--max-subscriptions", "2")
    client = clients(server.port())
    for i, channel in enumerate(("a", "b")):
        assert client.call({"op": "sub", "channel": channel, "id": i}) == {"ev": "ok", "id": i}
    refused = client.call({"op": "sub", "channel": "c", "id": 2})
    assert (refused["ev"], refused["code"]) == ("error", "too_many_subscriptions")
    assert client.call({"op": "sub", "channel": "a", "id": 3})["ev"] == "ok"  # already in it
    client.call({"op": "unsub", "channel": "a", "id": 4})
    assert client.call({"op": "sub", "channel": "c", "id": 5}) == {"ev": "ok", "id": 5}
    assert server.stats()["errors"]["too_many_subscriptions"] == 1
    server.publish(channel="c", data="in c")
    assert client.recv()["data"] == "in c"


KEY = "test-key-0123456789"


def test_with_an_api_key_publishing_needs_it_and_stats_stay_open(serve, clients):
    server = serve("--workers", "1", "--max-connections", "10", env={"MANYDOORS_API_KEY": KEY})
    client = clients(server.port())
    assert client.call({"op": "sub", "channel": "veg", "id": 1})["ev"] == "ok"
    body = {"channel": "veg", "data": "hi"}
    for path, method, payload in (
        ("/api/publish", "POST", body),
        ("/api/presence?channel=veg", "GET", None),
        ("/api/connections", "GET", None),
    ):
        for key in (None, "wrong-key-0123456789", KEY[:-1]):
            status, answer = server.http(method, path, payload, key=key)
            assert (status, answer["error"]) == (401, "unauthorized"), (path, key)
        assert server.http(method, path, payload, key=KEY)[0] in (200, 202), path
    assert client.recv()["data"] == "hi"  # exactly the one authorized publish
    for path in ("/api/stats", "/metrics", "/healthz"):
        assert server.http("GET", path)[0] == 200, path


def test_protect_stats_guards_stats_and_metrics_but_not_health(serve):
    server = serve(
        "--workers", "1", "--max-connections", "10", "--protect-stats", "true",
        env={"MANYDOORS_API_KEY": KEY},
    )  # fmt: skip
    for path in ("/api/stats", "/metrics"):
        assert server.http("GET", path)[0] == 401, path
        assert server.http("GET", path, key=KEY)[0] == 200, path
    assert server.http("GET", "/healthz")[0] == 200


def test_deeply_nested_json_and_a_newline_in_a_name_are_answered_not_fatal(serve, clients):
    server = serve("--workers", "1", "--max-connections", "10")
    client = clients(server.port())
    nested = b'{"op":"pub","channel":"a","x":' + b"[" * 3000 + b"]" * 3000 + b"}\n"
    client.send(nested)
    assert client.recv()["code"] == "bad_json"
    bad_name = client.call({"op": "hello", "user": "ann\n", "id": 1})
    assert (bad_name["ev"], bad_name["code"]) == ("error", "bad_field")
    assert client.call({"op": "ping", "id": 2}) == {"ev": "pong", "id": 2}


def test_workers_run_below_the_supervisor_so_its_router_is_not_starved(serve):
    """worker_nice (default 10): every ack of a hello or sub waits for the router in the
    supervisor, which must not get only its equal share among many busy workers."""
    server = small(serve, workers=2)
    base = os.getpriority(os.PRIO_PROCESS, server.proc.pid)
    nices = [os.getpriority(os.PRIO_PROCESS, pid) for pid in server.worker_pids()]
    assert nices == [min(19, base + 10)] * 2
    level = small(serve, "--worker-nice", "0", workers=1)
    (pid,) = level.worker_pids()
    assert os.getpriority(os.PRIO_PROCESS, pid) == base
