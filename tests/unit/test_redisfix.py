"""Without redis-server the real-Redis tests skip locally and fail in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.redisfix import need_redis, redis_missing_reason


def test_missing_redis_skips_locally_and_fails_in_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = redis_missing_reason()
    assert reason is not None and "apt-get install -y redis-server" in reason
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y redis-server"):
        need_redis()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server"):
        need_redis()
