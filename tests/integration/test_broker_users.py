"""The launcher's per-service broker users (services.kit.bus.users) over their life: made for a stack on
its vhost, each able to use its own queues only, told apart from another stack's, deleted at stop and
with the vhost; the shared-URL fallback and production's refusal of it; and a consumer's queue declared
with the earlier (default-exchange) dead-letter arguments keeps working as it is, and what it parks
names the broker user that published it."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pika
import pika.exceptions
import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bus import Publisher, users
from services.kit.events import PermanentError, new_envelope
from services.launcher import LaunchError, Ports, Stack, StackConfig
from tests.conftest import _rabbitmqctl, delete_vhost, vhost_url
from tests.waits import wait_until


@pytest.fixture
def own_vhost():
    """A vhost of this test's own: the stacks here must not meet the session's e2e stack's users."""
    vhost = f"clinic-users-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    delete_vhost(vhost)


def broker_users() -> set[str]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_users"], check=True, capture_output=True, text=True
    )
    return {line.split("\t", 1)[0] for line in listed.stdout.splitlines() if line.strip()}


def stack_on(run_dir: Path, amqp_url: str, **env: str) -> Stack:
    stack = Stack(StackConfig(run_dir=run_dir, ports=Ports.free(), amqp_url=amqp_url, extra_env=env))
    run_dir.mkdir(parents=True, exist_ok=True)
    return stack


def made(stack: Stack) -> dict[str, str]:
    """What `start` does about broker users, without starting anything else."""
    stack._amqp_urls = stack._broker_users(stack.service_env())
    return stack._amqp_urls


def test_a_stack_makes_each_service_a_user_of_its_own_and_stop_deletes_them(tmp_path, own_vhost):
    url = vhost_url(own_vhost)
    first, second = stack_on(tmp_path / "a", url), stack_on(tmp_path / "b", url)
    urls = made(first)
    assert set(urls) == set(users.SERVICES)
    names = {first.broker_user(s) for s in users.SERVICES}
    assert all(name.startswith(f"{own_vhost}.") for name in names) and len(names) == len(users.SERVICES)
    assert names <= broker_users()
    # A second stack on the vhost has users of its own: the first one's stop leaves them be.
    made(second)
    assert not names & {second.broker_user(s) for s in users.SERVICES}

    # Each process gets its own URL; one that does not use the bus gets none at all.
    assert first._process_env("web", first.service_env())["AMQP_URL"] == urls["web"]
    assert "AMQP_URL" not in first._process_env("gateway", first.service_env())
    password = first.run_dir / "secrets" / "amqp-web.password"
    assert password.stat().st_mode & 0o777 == 0o600 and password.read_text() in urls["web"]

    with pika.BlockingConnection(pika.URLParameters(urls["web"])) as connection:
        connection.channel().queue_declare(f"web.own-{uuid.uuid4().hex[:6]}", auto_delete=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare("inbox.not-mine", auto_delete=True)
        assert refused.value.reply_code == 403

    first.stop()
    assert not names & broker_users()
    assert not first.broker_users_file.exists()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(urls["web"]))
    # What a stack leaves (here the second, never stopped) goes with the vhost.
    assert {second.broker_user(s) for s in users.SERVICES} <= broker_users()
    assert set(users.delete_vhost_users(own_vhost)) == {second.broker_user(s) for s in users.SERVICES}


def test_every_service_shares_the_url_when_told_to_or_when_users_cannot_be_made(tmp_path, capsys):
    shared = stack_on(tmp_path / "shared", "amqp://guest:guest@127.0.0.1:5672/x", AMQP_SERVICE_USERS="shared")
    assert made(shared) == {} and shared.amqp_url_of("inbox") == shared.config.amqp_url
    assert "every service connects as 'guest' (AMQP_SERVICE_USERS=shared)" in capsys.readouterr().out

    remote = "amqp://clinic:secret@rabbitmq.example:5672/clinic"
    assert made(stack_on(tmp_path / "dev", remote)) == {}
    assert "per-service users not created (the broker at rabbitmq.example is not on this machine)" in (
        capsys.readouterr().out
    )
    with pytest.raises(LaunchError, match="AMQP_SERVICE_USERS=shared"):
        made(stack_on(tmp_path / "prod", remote, CLINIC_MODE="production"))
    assert made(stack_on(tmp_path / "prod-shared", remote, CLINIC_MODE="production", AMQP_SERVICE_USERS="shared")) == {}


def delivered(message_id: str) -> object:
    return new_envelope(
        "message.delivered.v1", MessageDelivered(message_id=message_id), agency_id="a", producer="inbox"
    )


def test_a_queue_with_the_earlier_dead_letter_arguments_keeps_working(event_bus, caplog):
    """Declared before consumers dead-lettered through `<queue>.republish`: the broker refuses to
    redeclare it otherwise, so the consumer uses it as it is, retries and parking included."""
    retried, failing = delivered("m-retried"), delivered("m-fails")
    attempts: list[str] = []

    def handle(envelope) -> None:
        attempts.append(envelope.event_id)
        if envelope.event_id == failing.event_id:
            raise PermanentError("no good")
        if attempts.count(envelope.event_id) == 1:
            raise RuntimeError("once")

    consumer = event_bus.consumer("legacy", ["message.delivered.v1"], handle, max_retries=1)
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    channel = connection.channel()
    event_bus.topology.declare(channel)
    channel.queue_declare(
        consumer.queue, durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": consumer.parking_queue},
    )  # fmt: skip
    channel.queue_declare(
        consumer.retry_queue, durable=True,
        arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": consumer.queue},
    )  # fmt: skip
    connection.close()
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([retried, failing])
        wait_until(lambda: attempts.count(retried.event_id) == 2, timeout=20, message="the retried event, again")
        wait_until(lambda: event_bus.message_count(consumer.parking_queue) == 1, timeout=20)
    assert event_bus.message_count(consumer.retry_queue) == 0
    # Parked by the consumer, it names the user that first published it (the broker-checked user_id).
    properties, _body = event_bus.get(consumer.parking_queue)
    assert properties.user_id is None and properties.headers["x-published-by"] == "guest"
    used = [r for r in caplog.records if r.getMessage().startswith("queue declared with the earlier dead-letter")]
    assert {r.queue for r in used} == {consumer.queue, consumer.retry_queue}
