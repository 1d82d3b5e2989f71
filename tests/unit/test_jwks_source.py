"""How token verification keys are fetched: once per interval, even while directory is away."""

from __future__ import annotations

import pytest
import requests

from services.kit.auth import AuthError, JwksKeySource


class Source(JwksKeySource):
    def __init__(self, outcomes):
        super().__init__("http://directory.invalid/jwks", ttl_s=300, min_refetch_interval_s=5)
        self.outcomes = list(outcomes)
        self.fetches = 0
        self.now = 1000.0

    def _fetch(self):
        self.fetches += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        self._keys = outcome
        self._fetched_at = self.now


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr("services.kit.auth.time.monotonic", lambda: clock["now"])
    return clock


def test_an_outage_is_asked_about_once_per_interval(frozen_clock):
    source = Source([requests.ConnectionError("down"), requests.ConnectionError("down")])
    for _ in range(50):  # a burst of requests while directory is away
        with pytest.raises(AuthError) as caught:
            source.get("k1")
        assert caught.value.code == "auth_unavailable"
    assert source.fetches == 1
    frozen_clock["now"] += 6
    with pytest.raises(AuthError):
        source.get("k1")
    assert source.fetches == 2


def test_cached_keys_keep_working_when_a_refresh_fails(frozen_clock):
    source = Source([{"k1": "key-1"}, requests.ConnectionError("down")])
    assert source.get("k1") == "key-1"
    frozen_clock["now"] += 301  # stale: a refresh is due, and fails
    assert source.get("k1") == "key-1"
    assert source.get("k1") == "key-1" and source.fetches == 2  # no refetch storm


def test_an_unknown_key_id_triggers_one_refetch_per_interval(frozen_clock):
    source = Source([{"k1": "key-1"}, {"k1": "key-1", "k2": "key-2"}])
    assert source.get("k1") == "key-1"
    assert source.get("k2") is None  # within the interval: not refetched
    frozen_clock["now"] += 6
    assert source.get("k2") == "key-2" and source.fetches == 2
