"""Helpers the tests share, importable as ``support.*`` (tests/ is on sys.path).

- ``wait``: ``wait_for`` (blocking) and ``poll`` (asyncio): a condition with a deadline.
- ``client``: ``Client``, the blocking NDJSON client (plain or TLS).
- ``server``: ``manydoors serve`` as a subprocess (``Server``, ``launch``), ``run_load``.
- ``certfix``: a self-signed certificate; ``redisfix``: real redis-server processes.

bench/ imports ``support.certfix`` and ``support.redisfix`` too. The fixtures that start
things live in tests/live/conftest.py.
"""
