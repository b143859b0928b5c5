"""Each service's NATS user can do its job and nothing else: the grants derived in `shared/permissions.py`,
checked against the contracts and enforced by a real nats-server."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError

from visionyard.shared import commands, events, permissions, streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, responder
from visionyard.shared.messages import Message
from visionyard.shared.natsserver import NatsServer
from visionyard.shared.requests import TrackerQuery

REPO = Path(__file__).resolve().parents[2]


def concrete_messages() -> list[type[Message]]:
    """Every command and event class that is published on a subject of its own."""
    found: list[type[Message]] = []
    pending: list[type[Message]] = [Message]
    while pending:
        for cls in pending.pop().__subclasses__():
            pending.append(cls)
            if cls.__module__ not in (events.__name__, commands.__name__):
                continue
            kind = getattr(cls, "kind", None)
            family = getattr(cls, "family", "x")
            if isinstance(getattr(cls, "subject", None), str) or (kind and family):
                found.append(cls)
    return found


def test_every_published_message_has_a_producer_with_the_grant() -> None:
    # A new event or command without a producing service would be refused by every user at run time.
    produced = {cls for access in permissions.ACCESS.values() for cls in access.publishes}
    orphans = sorted(cls.__name__ for cls in concrete_messages() if cls not in produced)
    assert orphans == []


def test_every_durable_consumer_belongs_to_exactly_one_service() -> None:
    owners = [consumer.durable for access in permissions.ACCESS.values() for consumer in access.consumers]
    assert sorted(owners) == sorted(consumer.durable for consumer in streams.CONSUMERS)


def test_grants_name_only_the_users_own_consumers_and_inbox() -> None:
    tracker = permissions.grants(permissions.TRACKER)
    assert "$JS.API.CONSUMER.MSG.NEXT.EVENTS.tracker" in tracker.publish_allow
    assert not any("COMMANDS.runner" in subject or subject.startswith("cmd.") for subject in tracker.publish_allow)
    assert tracker.subscribe_allow[0] == "_INBOX_tracker.>" and tracker.allow_responses
    runner = permissions.grants(permissions.RUNNER)
    assert "$KV.trainer_capabilities.>" in runner.publish_allow
    assert "$KV.job_terminal.>" not in runner.publish_allow and not runner.allow_responses


def test_the_production_configuration_in_deploy_is_the_generated_one() -> None:
    # deploy/nats/authorization.conf is rendered from the code; regenerate it with
    # `python -m visionyard.shared.permissions > deploy/nats/authorization.conf`.
    committed = (REPO / "deploy" / "nats" / "authorization.conf").read_text()
    assert committed == permissions.production_authorization()


# -- on a real nats-server -------------------------------------------------------------------------

@pytest.fixture
def passwords() -> dict[str, str]:
    """A password per user."""
    return {user: secrets.token_urlsafe(16) for user in [*permissions.ACCESS, permissions.ADMIN_USER]}


@pytest.fixture
def locked_server(tmp_path: Path, passwords: dict[str, str]) -> Iterator[NatsServer]:
    """A nats-server with the generated users and permissions."""
    config = tmp_path / "auth.conf"
    config.write_text(permissions.server_authorization(passwords))
    server = NatsServer(store_dir=tmp_path / "nats", config_file=config, log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


class Connections:
    """One bus per service user, each with the topology part it declares."""

    def __init__(self, server: NatsServer, passwords: dict[str, str]) -> None:
        self.server = server
        self.passwords = passwords
        self.buses: dict[str, Bus] = {}
        self.errors: dict[str, list[str]] = {}

    async def bus(self, user: str) -> Bus:
        if user not in self.buses:
            self.errors[user] = []

            async def on_error(error: Exception, user: str = user) -> None:
                self.errors[user].append(str(error))

            bus = await Bus.connect(self.server.url, service=user, user=user, password=self.passwords[user],
                                    error_cb=on_error)
            await bus.ensure_topology()
            self.buses[user] = bus
        return self.buses[user]

    async def close(self) -> None:
        for bus in self.buses.values():
            await bus.nc.close()


@pytest.fixture
async def users(locked_server: NatsServer, passwords: dict[str, str]) -> AsyncIterator[Connections]:
    """Connections as each service's user (api first: it declares the COMMANDS stream the runner reads too)."""
    connections = Connections(locked_server, passwords)
    for user in ("api", "tracker", "storage", "runner"):
        await connections.bus(user)
    yield connections
    await connections.close()


async def stream_count(server: NatsServer, passwords: dict[str, str], stream: str) -> int:
    """How many messages `stream` holds (read as admin)."""
    nc = await nats.connect(server.url, user=permissions.ADMIN_USER, password=passwords[permissions.ADMIN_USER])
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def violations(errors: list[str]) -> list[str]:
    """The permissions violations among a connection's errors."""
    return [error for error in errors if "permissions violation" in error.lower()]


async def refused(errors: list[str], action: object, subject: str) -> None:
    """`action` (an awaitable) fails and the server reports a publish violation on `subject`."""
    with pytest.raises((NatsTimeoutError, asyncio.TimeoutError, nats.errors.Error)):
        await asyncio.wait_for(action, 3)  # type: ignore[arg-type]
    for _ in range(400):  # bounded; the refusal arrives asynchronously, later on a loaded machine
        if any(f'publish to "{subject}"'.lower() in error.lower() for error in violations(errors)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no permissions violation on {subject}: {errors}")


@pytest.mark.integration
async def test_the_tracker_cannot_publish_a_command(users: Connections, locked_server: NatsServer,
                                                    passwords: dict[str, str]) -> None:
    tracker = await users.bus("tracker")
    await refused(users.errors["tracker"], tracker.js.publish(subjects.CMD_TRAIN, b"{}", timeout=2),
                  subjects.CMD_TRAIN)
    assert await stream_count(locked_server, passwords, streams.COMMANDS.name) == 0
    # the API, whose command it is, can
    await (await users.bus("api")).js.publish(subjects.CMD_TRAIN, b"{}", timeout=5)
    assert await stream_count(locked_server, passwords, streams.COMMANDS.name) == 1


@pytest.mark.integration
async def test_a_runner_cannot_write_another_services_kv_but_reads_it_and_writes_its_own(users: Connections) -> None:
    runner = await users.bus("runner")
    terminal = await runner.kv(streams.KV_JOB_TERMINAL)
    await refused(users.errors["runner"], terminal.put("job-1", b'{"attempt": 1}'), "$KV.job_terminal.job-1")
    with pytest.raises(KeyNotFoundError):
        await terminal.get("job-1")  # nothing was written, and reading is allowed
    api_terminal = await (await users.bus("api")).kv(streams.KV_JOB_TERMINAL)
    await api_terminal.put("job-1", b'{"attempt": 2}')
    assert (await terminal.get("job-1")).value == b'{"attempt": 2}'
    await (await runner.kv(streams.KV_CAPABILITIES)).put("simple_cnn", b"{}")


@pytest.mark.integration
async def test_storage_cannot_take_the_runners_commands(users: Connections) -> None:
    await (await users.bus("api")).js.publish(subjects.CMD_TRAIN, b"{}", timeout=5)
    storage = await users.bus("storage")
    subscription = await storage.js.pull_subscribe_bind(durable=streams.RUNNER.durable, stream=streams.COMMANDS.name)
    await refused(users.errors["storage"], subscription.fetch(1, timeout=2),
                  "$JS.API.CONSUMER.MSG.NEXT.COMMANDS.runner")
    # nor delete it; the runner still gets the command
    await refused(users.errors["storage"], storage.js.delete_consumer(streams.COMMANDS.name, streams.RUNNER.durable),
                  "$JS.API.CONSUMER.DELETE.COMMANDS.runner")
    runner = await users.bus("runner")
    mine = await runner.js.pull_subscribe_bind(durable=streams.RUNNER.durable, stream=streams.COMMANDS.name)
    [msg] = await mine.fetch(1, timeout=5)
    assert msg.subject == subjects.CMD_TRAIN
    await msg.ack()


@pytest.mark.integration
async def test_replies_reach_only_the_requester(users: Connections) -> None:
    tracker, api = await users.bus("tracker"), await users.bus("api")
    broker = attached(tracker, service="tracker")

    @responder(broker, subjects.TRACKER_METRICS, queue="tracker")
    async def answer(query: TrackerQuery) -> dict[str, object]:
        return {"ok": True, "job_id": query.job_id}

    await broker.start()
    try:
        await tracker.nc.flush()  # the responder's subscription reaches the server before the request does
        reply = await api.request(subjects.TRACKER_METRICS, TrackerQuery(job_id="j"), timeout=5)
    finally:
        await broker.stop()
    assert json.loads(reply) == {"ok": True, "job_id": "j"}
    # the storage user may neither read the API's replies nor impersonate the tracker
    storage = await users.bus("storage")
    await storage.nc.subscribe("_INBOX_api.>")
    await storage.nc.subscribe(subjects.TRACKER_METRICS)
    await storage.nc.flush()
    for _ in range(400):  # bounded: the server's refusals arrive asynchronously, later on a loaded machine
        if len(violations(users.errors["storage"])) >= 2:
            break
        await asyncio.sleep(0.05)
    refusals = sorted(violations(users.errors["storage"]))
    assert [refusal.lower().split("subscription to ")[1] for refusal in refusals] == [
        '"_inbox_api.>"', '"tracker.metrics"'], refusals
