"""A tiny blocking client for the HTTP API (for the demo, the load generator, scripts).

It sends ``Authorization: Bearer $MANYDOORS_API_KEY`` when that variable is set, the
same variable the server reads its key from.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any


def _headers() -> dict[str, str]:
    key = os.environ.get("MANYDOORS_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def get_json(url: str, timeout: float = 30) -> Any:
    req = urllib.request.Request(url, headers=_headers())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: Any, timeout: float = 30) -> Any:
    headers = {"Content-Type": "application/json", **_headers()}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())
