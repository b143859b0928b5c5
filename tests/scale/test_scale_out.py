"""Scale-out, simulated on one machine: every service replicated over a 3-node NATS cluster, and jobs
that ride through losing a NATS node and an API replica while they train.

The stack (`EmbeddedStack`, each process its own): a NATS cluster of 3 nodes (loopback routes, a store
each, every service given all three URLs and its own NATS user) with every stream, KV bucket and the
object store at R3; 2 API replicas on one database; 3 runners; 2 trackers writing through an MLflow
server; 2 storage services on moto's S3. Three digits jobs train at once while a WebSocket client per
job follows it on API replica A from its first event. Mid-training the EVENTS stream's leader node is
killed (`kill -9`: JetStream must elect another leader while events keep coming), then replica A.
Each client reconnects to replica B with the last `seq` it holds.

Then: every job completed; each client's messages, A's part followed by B's, are exactly a fresh full
replay of the job's feed (every message once, in order, none missing, ending with `training_complete`)
and cover every progress event of the job in the EVENTS stream; the proof of `tests/jobproof.py` for
each job (MLflow holds every point once, every checkpoint in S3 has its sha256, no trainer left); and
every other process survived the node loss.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from visionyard.cli.stack import EmbeddedStack
from visionyard.shared import streams, subjects
from visionyard.shared.config import server_urls
from visionyard.shared.natsserver import free_port

from ..jobproof import (
    S3_KEY,
    TERMINAL,
    Proof,
    get_job,
    job_events_with_seq,
    poll,
    s3_client,
    start_job,
    stored_checkpoints,
    upload_digits,
)

pytestmark = pytest.mark.e2e

JOBS = 3
# Long enough that the jobs still train after the node loss has been ridden through (a leader election
# takes a few seconds) and replica A is killed after it; each epoch is about a second on 2 idle cores.
EPOCHS = 12
INTERNAL_BUCKET = "scale-internal"
EXTERNAL_BUCKET = "scale-external"
# A killed API replica's unacknowledged projector batch comes back to the other replica after this long;
# the tracker's and storage's in a node loss likewise. The runner keeps its default (30 s): a leader
# election must not cost a job its attempt.
ACK_WAITS = {"api-projector": 8.0, "tracker": 10.0, "storage-artifacts": 10.0}
TERMINAL_MESSAGES = ("training_complete", "training_error")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[EmbeddedStack]:
    """The scaled-out stack: 3 NATS nodes, 2 APIs, 3 runners, 2 trackers (+ MLflow server), 2 storage."""
    data_dir = tmp_path_factory.mktemp("scale") / "data"
    scaled = EmbeddedStack(
        data_dir=data_dir, api_port=free_port(), runners=3, replicas={"api": 2, "tracker": 2, "storage": 2},
        nats_nodes=3, storage_backend="s3",
        storage_env={
            "VISIONYARD_STORAGE_S3_ENDPOINT_URL": s3_endpoint,
            "VISIONYARD_STORAGE_INTERNAL_BUCKET": INTERNAL_BUCKET,
            "VISIONYARD_STORAGE_EXTERNAL_BUCKET": EXTERNAL_BUCKET,
            "VISIONYARD_STORAGE_S3_ACCESS_KEY_ID": S3_KEY,
            "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY": S3_KEY,
        },
        extra_env={
            "VISIONYARD_TOPOLOGY_ACK_WAITS": json.dumps(ACK_WAITS),
            # Every checkpoint staged: each job has stored ones before the faults strike.
            "VISIONYARD_RUNNER_CHECKPOINT_INTERVAL_SECONDS": "0",
            "VISIONYARD_RUNNER_SLOTS": "1",
        },
        ready_timeout=180.0,
    )
    with scaled:
        started = scaled.pids()
        yield scaled
    left = [pid for pid in started if _alive(pid)]
    assert left == [], f"processes {left} survived the stack's shutdown"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- the WebSocket clients -------------------------------------------------------------------------


@dataclass
class Follower:
    """One job's WebSocket client: every message with a `seq` it got, per connection, in order."""

    job_id: str
    parts: list[list[dict[str, Any]]] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Everything received, across connections, in the order received."""
        return [message for part in self.parts for message in part]

    @property
    def last_seq(self) -> int:
        """The highest `seq` it holds (what it reconnects with)."""
        return max((message["seq"] for message in self.messages), default=0)

    @property
    def finished(self) -> bool:
        """Whether it got the job's terminal message."""
        return any(message["type"] in TERMINAL_MESSAGES for message in self.messages)

    def read(self, api_url: str, *, last_seq: int, timeout: float) -> str:
        """One connection from after `last_seq`; how it ended: `terminal`, `closed`, `refused` or `timeout`."""
        url = api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={self.job_id}&last_seq={last_seq}"
        part: list[dict[str, Any]] = []
        self.parts.append(part)
        self.connections.append(api_url)
        deadline = time.monotonic() + timeout
        try:
            with connect(url, open_timeout=10) as socket:
                while time.monotonic() < deadline:
                    try:
                        message = json.loads(socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
                    except TimeoutError:
                        return "timeout"
                    if "seq" not in message:
                        continue  # connected / subscribed: about the connection, not the job
                    part.append(message)
                    if message["type"] in TERMINAL_MESSAGES:
                        return "terminal"
        except ConnectionClosed:
            return "closed"
        except (OSError, TimeoutError) as error:
            return f"refused: {error}"
        return "timeout"

    def follow(self, api_url: str, *, last_seq: int, timeout: float, retry: bool) -> threading.Thread:
        """Read in a thread from after `last_seq`; with `retry`, reconnect (to the same API) until the end."""

        def run() -> None:
            deadline = time.monotonic() + timeout
            try:
                since = last_seq
                while time.monotonic() < deadline and not self.finished:
                    outcome = self.read(api_url, last_seq=since, timeout=deadline - time.monotonic())
                    if outcome == "terminal" or not retry:
                        return
                    since = self.last_seq
                    time.sleep(0.2)  # a pause between reconnects, as any client keeps
            finally:
                self.ended.set()

        self.ended.clear()
        thread = threading.Thread(target=run, name=f"ws-job-{self.job_id}", daemon=True)
        thread.start()
        return thread


def full_replay(api_url: str, job_id: str) -> list[dict[str, Any]]:
    """The job's whole feed as a new client gets it (`last_seq=0`)."""
    follower = Follower(job_id)
    assert follower.read(api_url, last_seq=0, timeout=60) == "terminal"
    return follower.messages


def shape(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(seq, type) of each message: what "once, in order" is checked on."""
    return [(message["seq"], message["type"]) for message in messages]


# -- the broker, seen by an operator ---------------------------------------------------------------


def topology(admin_url: str) -> dict[str, dict[str, Any]]:
    """Each stream's replicas and leader (KV buckets and the object store are streams too)."""

    async def read() -> dict[str, dict[str, Any]]:
        import nats

        nc = await nats.connect(server_urls(admin_url))
        try:
            js = nc.jetstream(timeout=5)
            names = [spec.name for spec in streams.STREAMS]
            names += [f"KV_{bucket}" for bucket in streams.KV_BUCKETS] + [f"OBJ_{streams.OBJECT_STAGING}"]
            found = {}
            for name in names:
                info = await js.stream_info(name)
                found[name] = {"replicas": info.config.num_replicas,
                               "leader": info.cluster.leader if info.cluster else None}
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def events_leader(admin_url: str) -> str | None:
    """The EVENTS stream's leader, or None while there is none (or no node answers)."""

    async def read() -> str | None:
        import nats

        nc = await nats.connect(server_urls(admin_url))
        try:
            info = await nc.jetstream(timeout=2).stream_info(streams.EVENTS.name)
            return info.cluster.leader if info.cluster else None
        finally:
            await nc.close()

    try:
        return asyncio.run(read())
    except Exception:  # an election in progress: the request times out or finds no leader
        return None


def test_jobs_ride_through_losing_a_nats_node_and_an_api_replica(
    stack: EmbeddedStack, s3_endpoint: str, tmp_path: Path
) -> None:
    api_a, api_b = stack.api_urls
    admin_url = stack.admin_nats_url
    assert stack.nats_cluster is not None and len(stack.nats_cluster.nodes) == 3
    replicas = {name: about["replicas"] for name, about in topology(admin_url).items()}
    assert replicas == {name: 3 for name in replicas}, replicas

    with httpx.Client(base_url=api_a, timeout=30) as client_a:
        dataset_id = upload_digits(client_a, tmp_path)
        jobs = [start_job(client_a, dataset_id, epochs=EPOCHS, experiment="scale-out") for _ in range(JOBS)]
    followers = [Follower(job_id) for job_id in jobs]
    # On replica A from each job's first event; the thread ends when A goes away.
    readers = [follower.follow(api_a, last_seq=0, timeout=600, retry=False) for follower in followers]

    with httpx.Client(base_url=api_b, timeout=30) as api:
        # Mid-training: every job runs, with a checkpoint stored, and its client is following it.
        for job_id in jobs:
            poll(lambda job_id=job_id: stored_checkpoints(api, job_id)["last"]["epoch"],
                 lambda epoch: epoch is not None and epoch >= 1, timeout=240)
        assert [get_job(api, job_id)["status"] for job_id in jobs] == ["running"] * JOBS
        assert all(follower.messages for follower in followers)

        # Kill the node leading the EVENTS stream: the stream every job event goes to must elect a new leader.
        leader = poll(lambda: events_leader(admin_url), bool, timeout=30)
        node = stack.nats_cluster.node_named(leader)
        connections = node.monitor("/connz")["num_connections"]
        stream_end = max(seq for seq, _ in job_events_with_seq(admin_url, subjects.EVT_JOB_ALL))
        node_killed_at = time.monotonic()
        node.stop(kill=True)
        new_leader = poll(lambda: events_leader(admin_url), lambda name: name not in (None, leader), timeout=60)
        election_s = time.monotonic() - node_killed_at
        # Training goes on through the loss: every job stores new progress after it.
        poll(lambda: {event["job_id"] for seq, event in job_events_with_seq(admin_url, subjects.job_event("*", "progress"))
                      if seq > stream_end}, lambda moving: moving >= set(jobs), timeout=120)
        statuses = [get_job(api, job_id)["status"] for job_id in jobs]
        assert statuses == ["running"] * JOBS, f"the API replica must be killed mid-training: {statuses}"

        # Kill replica A: its clients lose their sockets and reconnect to B with the last seq they hold.
        api_a_process = stack.service("api-1").process
        os.kill(api_a_process.pid, signal.SIGKILL)
        api_a_process.wait(timeout=10)
        api_killed_at = time.monotonic()
        for reader in readers:
            reader.join(timeout=30)
            assert not reader.is_alive(), "a client kept reading from a killed API replica"
        held = {follower.job_id: follower.last_seq for follower in followers}
        # What replica A's live feeds passed on after the node loss (they ride through it, or the
        # clients catch up on B from where they stopped).
        on_a_after_loss = {f.job_id: len([m for m in f.parts[0] if m["seq"] > stream_end]) for f in followers}
        resumed = [follower.follow(api_b, last_seq=follower.last_seq, timeout=300, retry=True)
                   for follower in followers]
        for reader in resumed:
            reader.join(timeout=320)

        # Every job completed.
        finals = [poll(lambda job_id=job_id: get_job(api, job_id), lambda j: j["status"] in TERMINAL, timeout=240)
                  for job_id in jobs]
        assert [final["status"] for final in finals] == ["completed"] * JOBS, finals
        # A leader election takes seconds, well within the runners' ack wait: no job lost its attempt.
        assert [final["attempt"] for final in finals] == [1] * JOBS, finals
        completed_s = time.monotonic() - api_killed_at

        for follower in followers:
            job_id = follower.job_id
            assert follower.finished, f"job {job_id}: no terminal message on replica B: {shape(follower.messages)[-5:]}"
            # Every message once, in order, none missing: A's part and B's part are exactly a full replay.
            replay = full_replay(api_b, job_id)
            assert shape(follower.messages) == shape(replay), {"job": job_id, "held_at_api_kill": held[job_id]}
            assert follower.messages[-1]["type"] == "training_complete"
            assert any(follower.parts[1:]), "the client should have resumed on replica B"
            seqs = [message["seq"] for message in follower.messages]
            assert seqs == sorted(seqs)
            # ... and they carry every progress event of the job's final attempt that the EVENTS stream holds.
            final_attempt = get_job(api, job_id)["attempt"]
            progress = {seq: event for seq, event in job_events_with_seq(admin_url, subjects.job_event(job_id, "progress"))
                        if event["attempt"] == final_attempt}
            shown = {message["seq"] for message in follower.messages if message["type"] == "training_progress"}
            assert shown == set(progress), {"missing": sorted(set(progress) - shown),
                                            "extra": sorted(shown - set(progress))}
            assert max(event["epoch"] for event in progress.values()) == EPOCHS

        # MLflow holds every point once, every checkpoint verifies, nothing of a job is left running.
        figures: list[dict[str, Any]] = []
        proof = Proof(api=api, nats_url=admin_url, tracking_uri=stack.tracking_uri, data_dir=stack.data_dir,
                      s3={"client": s3_client(s3_endpoint), "bucket": INTERNAL_BUCKET}, figures=figures)
        for job_id in jobs:
            proof.check(job_id, expected_status="completed", scenario="scale-out: NATS node and API replica killed",
                        fault_at=node_killed_at)

    # Only what was killed is gone: every other service rode through the node loss.
    assert [service.name for service in stack.dead_services()] == ["api-1"], [
        stack.describe_exit(service) for service in stack.dead_services() if service.name != "api-1"]
    assert [n.server_name for n in stack.nats_cluster.nodes if not n.running] == [leader]
    # Every service ran as its own NATS user throughout: no node refused anything it needed.
    assert stack.permission_violations() == []
    print("SCALE-OUT " + json.dumps({
        "killed_node": leader, "its_client_connections": connections, "new_events_leader": new_leader,
        "election_s": round(election_s, 2), "api_kill_to_all_completed_s": round(completed_s, 2),
        "ws_messages": {f.job_id: len(f.messages) for f in followers},
        "ws_messages_on_a_after_node_loss": on_a_after_loss,
        "ws_connections": {f.job_id: len(f.connections) for f in followers},
        "attempts": {final["id"]: final["attempt"] for final in finals},
        "jobs": figures,
    }, sort_keys=True))
