"""The deadline clock: the wall clock unless a test moves it, and only where the setting allows."""

from __future__ import annotations

import time

import pytest

from services.kit import clock
from services.kit.http import create_app
from services.kit.settings import Env


@pytest.fixture(autouse=True)
def _fresh_clock():
    clock.reset()
    clock.enable(False)
    yield
    clock.reset()
    clock.enable(False)


def test_now_is_the_wall_clock_until_moved():
    assert abs(clock.now_ms() - time.time() * 1000) < 1000
    assert clock.offset_ms() == 0


def test_advance_moves_the_clock_and_runs_every_pass_once_with_the_new_time():
    seen = []
    clock.enable()
    clock.on_advance("escalation", lambda now: seen.append(now) or 2)
    answer = clock.advance(31 * 60_000)
    assert answer["offset_ms"] == 31 * 60_000
    assert seen == [answer["now_ms"]]
    assert answer["passes"] == {"escalation": 2}
    assert clock.now_ms() - time.time() * 1000 > 30 * 60_000


def test_registering_a_pass_again_replaces_it():
    clock.enable()
    clock.on_advance("p", lambda now: 1)
    clock.on_advance("p", lambda now: 2)
    assert clock.advance(0)["passes"] == {"p": 2}


def test_advance_is_refused_while_the_clock_is_off():
    with pytest.raises(RuntimeError):
        clock.advance(1000)
    assert clock.offset_ms() == 0


def test_production_refuses_the_setting_and_development_reads_it():
    env = Env("inbox", {"CLINIC_TEST_CLOCK": "1", "CLINIC_MODE": "production"})
    assert clock.test_clock_setting(env) is False
    assert any("CLINIC_TEST_CLOCK" in problem for problem in env.problems)
    assert clock.test_clock_setting(Env("inbox", {"CLINIC_TEST_CLOCK": "true"})) is True
    assert clock.test_clock_setting(Env("inbox", {})) is False
    bad = Env("inbox", {"CLINIC_TEST_CLOCK": "maybe"})
    assert clock.test_clock_setting(bad) is False
    assert bad.problems


def _client():
    app = create_app("test", verifier=None)
    app.register_blueprint(clock.control_blueprint())
    return app.test_client()


def test_the_route_is_404_while_off_and_validates_its_body_while_on():
    client = _client()
    assert client.post("/internal/v1/test-clock", json={"advance_ms": 1}).status_code == 404
    clock.enable()
    bad = client.post("/internal/v1/test-clock", json={"advance_ms": {"$gt": ""}})
    assert bad.status_code == 400
    assert bad.get_json()["code"] == "invalid_type"
    assert client.post("/internal/v1/test-clock", json={"advance_ms": -5}).status_code == 400
    ok = client.post("/internal/v1/test-clock", json={"advance_ms": 60_000})
    assert ok.status_code == 200
    assert ok.get_json()["offset_ms"] == 60_000
