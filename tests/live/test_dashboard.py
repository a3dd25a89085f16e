"""The live dashboard: the SSE stream it reads, and the page itself in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from support.wait import wait_for

# The README's screenshot is refreshed only on request (MANYDOORS_SCREENSHOT=1), so a
# test run leaves the working tree as it found it.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def sse_events(sock_file: Any, count: int) -> list[dict[str, Any]]:
    events = []
    for raw in sock_file:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
            if len(events) == count:
                return events
    raise AssertionError(f"stream ended after {len(events)} events")


def test_stream_sends_a_stats_event_every_second(serve, clients):
    server = serve("--workers", "2", "--max-connections", "1000")
    with urllib.request.urlopen(server.api + "/api/stream", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        start = time.monotonic()
        first, _ = sse_events(resp, 2)
        assert 0.5 < time.monotonic() - start < 5
        assert first["connections"] == 0
        assert len(first["services"][0]["workers"]) == 2
        clients(server.port())
        wait_for(lambda: sse_events(resp, 1)[0]["connections"] == 1, what="1 connection")


def test_page_and_chart_library_are_served_from_the_package(serve):
    server = serve("--workers", "1", "--max-connections", "100")
    status, page = server.http("GET", "/")
    assert status == 200 and 'id="total-connections"' in page
    for path in ("/static/app.js", "/static/vendor/uPlot.iife.min.js"):
        status, body = server.http("GET", path)
        assert status == 200 and len(body) > 1000, path
        assert f'src="{path[1:]}"' in page  # relative: works behind a path prefix too


def test_shutdown_is_not_held_by_an_open_stream(serve):
    server = serve("--workers", "1", "--max-connections", "100")
    host, port = server.api.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert server.stop() == 0
        # The drain takes its own moment; a stream holding runner.cleanup would add 60 s.
        assert time.monotonic() - start < 10, server.output()
        sock.settimeout(5)
        while sock.recv(4096):  # the server ended the stream and closed the connection
            pass


# --- the page in headless Chromium (the browser fixture: conftest.py) --------------


def shown_number(driver: Any, element_id: str) -> int | None:
    from selenium.webdriver.common.by import By

    # The first number in the element's text: "1,234" or "1,234 in all".
    match = re.match(r"[\d,]+", driver.find_element(By.ID, element_id).text.strip())
    return int(match.group().replace(",", "")) if match else None


def test_dashboard_shows_connections_rising_without_console_errors(serve, clients, browser):
    from selenium.webdriver.common.by import By

    server = serve("--workers", "2", "--max-connections", "1000")
    browser.get(server.api + "/")
    wait_for(lambda: shown_number(browser, "total-connections") == 0, 20, "the page to show 0")
    assert browser.find_element(By.ID, "status").text == "live"

    people = [clients(server.port()) for _ in range(5)]
    wait_for(lambda: shown_number(browser, "total-connections") == 5, 20, "the page to show 5")
    for i, c in enumerate(people):
        c.call({"op": "hello", "user": f"u{i}", "id": 1})
        c.call({"op": "sub", "channel": "news", "id": 2})

    # Some traffic, so the message charts and totals have something to show.
    def published_and_shown() -> bool:
        server.publish(channel="news", data={"headline": "hello"})
        return (shown_number(browser, "out-total") or 0) >= 300

    wait_for(published_and_shown, 30, "messages out to reach the page")
    for i in range(2):  # one worker row and one fd bar per worker
        assert browser.find_element(By.ID, f"worker-chat-{i}").is_displayed()
        assert browser.find_element(By.ID, f"fds-chat-{i}").is_displayed()
    assert browser.find_element(By.ID, "mem-per-conn").text.endswith("B")

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    # The whole page, not just the window: DevTools captures beyond the viewport.
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MANYDOORS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(png)


WS_SERVICE = """
[api]
port = 0

[[service]]
name = "web"
port = 0
protocol = "websocket"
workers = 1
max_connections = 100
"""

# Runs in the page: a browser's own WebSocket connects, says hello, subscribes, and
# hands back every event until the published one arrives.
BROWSER_CLIENT = """
const [url, done] = [arguments[0], arguments[arguments.length - 1]];
const events = [];
const ws = new WebSocket(url);
ws.onmessage = (m) => {
  const ev = JSON.parse(m.data);
  events.push(ev);
  if (ev.ev === "welcome") {
    ws.send(JSON.stringify({op: "hello", user: "chromium", id: 1}));
    ws.send(JSON.stringify({op: "sub", channel: "news", id: 2}));
  }
  if (ev.ev === "ok" && ev.id === 2) window.__subscribed = true;
  if (ev.ev === "msg") { ws.close(1000); done(events); }
};
ws.onerror = () => done(["error"]);
"""


def test_chromium_websocket_connects_subscribes_and_receives(serve, browser):
    import threading

    server = serve(config=WS_SERVICE)
    browser.get(server.api + "/")  # any page of ours: the script needs a document
    browser.set_script_timeout(20)

    def publish_once_subscribed() -> None:
        wait_for(lambda: browser_subscribed(server), what="browser subscribed")
        server.publish(channel="news", data={"to": "the browser"})

    publisher = threading.Thread(target=publish_once_subscribed)
    publisher.start()
    events = browser.execute_async_script(BROWSER_CLIENT, f"ws://127.0.0.1:{server.port('web')}/")
    publisher.join(20)
    assert events[0]["ev"] == "welcome" and events[0]["service"] == "web"
    assert {"ev": "ok", "id": 2} in events
    assert events[-1]["data"] == {"to": "the browser"} and events[-1]["channel"] == "news"
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def browser_subscribed(server: Any) -> bool:
    return bool(server.stats()["broker"]["channels"] >= 1)
