"""The embedded stack: our own nats-server plus the four services as separate processes.

`visionyard up` and `visionyard demo` both use `EmbeddedStack`. It starts only what it owns (a fresh
nats-server, then api, tracker, storage and the runners, each in its own process group with its log
under `<data-dir>/logs/`), waits until the API reports ready, and on stop terminates them in reverse
order (SIGTERM, a grace period, then SIGKILL of the whole group) so nothing is left running.

Every process it starts carries a parent-death signal, so none outlives the stack's process even when
that is killed with `kill -9`. `tend()` supervises: a process that exited is restarted with backoff
(`supervision.py`), the others keep serving, and `<data-dir>/stack.json` records each process's state,
pid and restarts for `visionyard status` (`stackstate.py`).

Scaled out on one machine (the scale-out test): `nats_nodes=3` runs a NATS cluster instead of one
server (streams, KV buckets and the object store at R3), and `replicas` runs several APIs, trackers and
storage services beside the `runners`; several trackers write through an MLflow server the stack runs.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from visionyard.cli.stackstate import (
    ProcessState,
    StackState,
    process_start_ticks,
    read_state,
    state_path,
    write_state,
)
from visionyard.cli.supervision import RestartPolicy, RestartRecord
from visionyard.shared import permissions
from visionyard.shared.config import server_urls
from visionyard.shared.deathsignal import dying_with_parent
from visionyard.shared.natsserver import NatsCluster, NatsServer, free_port

# Each service's NATS user (`shared/permissions.py`).
NATS_USERS = {"api": "api", "runner": "runner", "tracker": "tracker", "storage": "storage"}
NATS_AUTH_DIR = "nats-auth"

# Start order: the tracker and storage subscribe before the API can publish, runners last.
SERVICE_ORDER = ("tracker", "storage", "api", "runner")
# The most replicas a stream, KV bucket or object store gets on a cluster (JetStream allows up to 5).
MAX_STREAM_REPLICAS = 3
DEFAULT_COMMANDS: dict[str, list[str]] = {
    "api": ["visionyard-api"],
    "runner": ["visionyard-runner"],
    "tracker": ["visionyard-tracker"],
    "storage": ["visionyard-storage"],
}


class StackError(RuntimeError):
    """The stack could not start (port taken, a service died, not ready in time)."""


@dataclass
class ServiceProcess:
    """One supervised service: its name, the process (leader of its own group), its log and restarts."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    kind: str = ""
    # Which replica of its kind (1-based): `runner-2` is index 2.
    index: int = 1
    record: RestartRecord = field(default_factory=RestartRecord)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also its process-group id."""
        return self.process.pid


def log_tail(path: Path, *, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        content = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(content.splitlines()[-lines:])


def ensure_port_free(port: int, *, host: str = "127.0.0.1", what: str = "API") -> None:
    """Refuse (StackError) if something already listens on `host:port`."""
    with socket.socket() as probe:
        # SO_REUSEADDR as uvicorn sets it: only a live listener, not a TIME_WAIT, makes bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                raise StackError(
                    f"port {port} on {host} is already in use, so the {what} cannot listen there "
                    f"(another `visionyard up`?). Stop it or pick another port, e.g. --api-port {free_port()}."
                ) from error
            raise


def nats_passwords(data_dir: Path) -> dict[str, str]:
    """The NATS users' passwords of the stack in `data_dir`, generated on first use (file mode 0600)."""
    directory = Path(data_dir) / NATS_AUTH_DIR
    path = directory / "passwords.json"
    try:
        known: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    wanted = [*permissions.ACCESS, permissions.ADMIN_USER]
    if all(user in known for user in wanted):
        return known
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    passwords = {user: known.get(user) or secrets.token_urlsafe(24) for user in wanted}
    _write_private(path, json.dumps(passwords, indent=2))
    return passwords


def admin_nats_url(data_dir: Path, nats_url: str) -> str:
    """`nats_url` (one server, or a cluster's comma-separated ones) with the stack's admin credentials
    (for operators and tests; never given to a service)."""
    password = nats_passwords(data_dir)[permissions.ADMIN_USER]
    servers = []
    for server in server_urls(nats_url):
        scheme, rest = server.split("://", 1)
        servers.append(f"{scheme}://{permissions.ADMIN_USER}:{password}@{rest}")
    return ",".join(servers)


def _write_private(path: Path, text: str) -> None:
    # Created 0600 before any byte is written: the file holds passwords.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _resolve(command: Sequence[str]) -> list[str]:
    """Prefer the console script installed beside this interpreter, so the venv need not be on PATH."""
    argv = list(command)
    if "/" in argv[0]:
        return argv
    beside = Path(sys.executable).with_name(argv[0])
    if beside.exists():
        argv[0] = str(beside)
    return argv


@dataclass
class EmbeddedStack:
    """nats-server + api + tracker + storage + N runners, all under one data directory."""

    data_dir: Path
    api_port: int = 8000
    api_host: str = "127.0.0.1"
    nats_port: int = 0
    runners: int = 1
    storage_backend: str = "local"
    storage_env: Mapping[str, str] = field(default_factory=dict)
    mlflow_ui_port: int | None = None
    # Each service connects as its own NATS user with only its permissions (`shared/permissions.py`).
    nats_permissions: bool = True
    service_commands: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_COMMANDS))
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Replicas of the api, tracker and storage (default 1 each; runners are `runners`). API replicas share
    # the data directory (database, signing key) and listen on `api_port` (the first) and free ports.
    # Several trackers need an MLflow server (SQLite takes one writer): the stack runs one (`mlflow ui`, on
    # `mlflow_ui_port` or a free port) before them and points them at it.
    replicas: Mapping[str, int] = field(default_factory=dict)
    # More than 1: a NATS cluster of that many nodes instead of one server. Every service gets every
    # node's URL (it fails over when one goes) and declares the topology with min(nodes, 3) replicas.
    # The nodes are not restarted by `tend()`: riding through the loss of one is what a cluster is for.
    nats_nodes: int = 1
    ready_timeout: float = 60.0
    stop_timeout: float = 20.0
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    echo: Callable[[str], None] = field(default=lambda line: None)
    # Where exits and crash loops are reported (`up`: stderr); defaults to `echo`.
    report: Callable[[str], None] | None = None
    nats: NatsServer | None = field(default=None, init=False)
    nats_cluster: NatsCluster | None = field(default=None, init=False)
    nats_record: RestartRecord = field(init=False)
    services: list[ServiceProcess] = field(default_factory=list, init=False)
    mlflow_ui: ServiceProcess | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    _state_written: bool = field(default=False, init=False)
    # Each API replica's port, by replica index (stable across restarts).
    _api_ports: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.nats_record = RestartRecord(policy=self.restart_policy)
        for kind, count in self.replicas.items():
            if kind not in ("api", "tracker", "storage"):
                raise ValueError(f"replicas: {kind!r} is not api, tracker or storage (runners: `runners`)")
            if count < 1:
                raise ValueError(f"replicas: {kind} needs at least one replica, got {count}")
        if self.nats_nodes < 1:
            raise ValueError(f"nats_nodes: at least one, got {self.nats_nodes}")
        self._api_ports = {1: self.api_port}

    def count(self, kind: str) -> int:
        """How many processes of `kind` (api, tracker, storage, runner) the stack runs."""
        return self.runners if kind == "runner" else int(self.replicas.get(kind, 1))

    def label(self, kind: str, index: int) -> str:
        """The name of replica `index` of `kind`: the kind itself when it runs alone, else `kind-index`."""
        return kind if self.count(kind) == 1 else f"{kind}-{index}"

    # Locations every caller prints
    @property
    def api_url(self) -> str:
        """Base URL of the API (its first replica)."""
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def api_urls(self) -> list[str]:
        """Base URL of each API replica, in replica order."""
        return [f"http://{self.api_host}:{self._api_port(index)}" for index in range(1, self.count("api") + 1)]

    def _api_port(self, index: int) -> int:
        if index not in self._api_ports:
            self._api_ports[index] = free_port()
        return self._api_ports[index]

    @property
    def docs_url(self) -> str:
        """The OpenAPI docs page."""
        return f"{self.api_url}/docs"

    @property
    def mlflow_store_uri(self) -> str:
        """The MLflow store (a SQLite file under the data directory)."""
        return f"sqlite:///{self.data_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        """Where the trackers write: the store itself, or with several trackers the MLflow server in front of it."""
        if self.count("tracker") > 1:
            return f"http://127.0.0.1:{self.mlflow_ui_port}"
        return self.mlflow_store_uri

    @property
    def mlflow_ui_command(self) -> list[str]:
        """The command that shows the runs in MLflow's UI."""
        port = self.mlflow_ui_port or 5000
        return ["mlflow", "ui", "--backend-store-uri", self.mlflow_store_uri,
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    @property
    def mlflow_ui_url(self) -> str | None:
        """URL of the MLflow UI we started, if any."""
        return f"http://127.0.0.1:{self.mlflow_ui_port}" if self.mlflow_ui is not None else None

    @property
    def logs_dir(self) -> Path:
        """Where each service's stdout/stderr goes."""
        return self.data_dir / "logs"

    @property
    def nats_auth_config(self) -> Path:
        """The generated nats-server configuration (users and permissions)."""
        return self.data_dir / NATS_AUTH_DIR / "nats-server.conf"

    @property
    def nats_url(self) -> str:
        """The broker's URL the services get: the server's, or every cluster node's, comma-separated."""
        if self.nats_cluster is not None:
            return self.nats_cluster.url
        assert self.nats is not None
        return self.nats.url

    @property
    def admin_nats_url(self) -> str:
        """The broker's URL with admin credentials (tests, benchmarks, operators)."""
        return admin_nats_url(self.data_dir, self.nats_url) if self.nats_permissions else self.nats_url

    @property
    def stream_replicas(self) -> int:
        """How many replicas the services give each stream, KV bucket and the object store."""
        return min(self.nats_nodes, MAX_STREAM_REPLICAS)

    def permission_violations(self) -> list[str]:
        """nats-server's log lines (every node's, on a cluster) about a client refused by its permissions."""
        lines = []
        for path in sorted(self.logs_dir.glob("nats-server*.log")):
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                continue
        return [line for line in lines if "Violation" in line]

    @property
    def state_file(self) -> Path:
        """The state `visionyard status` reads."""
        return state_path(self.data_dir)

    # Lifecycle
    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> EmbeddedStack:
        """Start nats-server and every service, wait for API readiness; on any failure stop all."""
        previous = read_state(self.state_file)
        if previous is not None and previous.alive and previous.pid != os.getpid():
            raise StackError(f"another `visionyard up` (pid {previous.pid}) is running with the data directory "
                             f"{self.data_dir}; stop it first or pick another --data-dir")
        ensure_port_free(self.api_port, host=self.api_host)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        try:
            config = None
            if self.nats_permissions:
                config = self.nats_auth_config
                _write_private(config, permissions.server_authorization(nats_passwords(self.data_dir)))
            self._start_broker(config)
            if self.count("tracker") > 1:
                # The trackers open the store at start: the server must answer before the first one runs.
                self.mlflow_ui_port = self.mlflow_ui_port or free_port()
                self._start_mlflow_ui()
                self._wait_mlflow_server()
            for name in SERVICE_ORDER:
                for index in range(1, self.count(name) + 1):
                    if name == "api" and index > 1:
                        # One replica migrates the empty database first; they would race on it together.
                        self._wait_ready(self.api_urls[:index - 1])
                    self._spawn(name, label=self.label(name, index), index=index)
            self.write_state()
            self._wait_ready(self.api_urls)
            if self.mlflow_ui_port is not None and self.mlflow_ui is None:
                self._start_mlflow_ui()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_broker(self, config: Path | None) -> None:
        if self.nats_nodes > 1:
            self.nats_cluster = NatsCluster(root=self.data_dir / "nats", size=self.nats_nodes, config_file=config,
                                            log_pattern=str(self.logs_dir / "nats-server-{index}.log"),
                                            new_session=True, die_with_parent=True)
            self.echo(f"starting a NATS cluster of {self.nats_nodes} nodes")
            self.nats_cluster.start()
            return
        self.nats = NatsServer(store_dir=self.data_dir / "nats", port=self.nats_port,
                               log_file=self.logs_dir / "nats-server.log", new_session=True,
                               die_with_parent=True, config_file=config)
        self.echo(f"starting nats-server on port {self.nats_port or '(free port)'}")
        self.nats.start()
        self.nats_record.started(time.monotonic())

    def _env_for(self, name: str, *, index: int) -> dict[str, str]:
        prefix = f"VISIONYARD_{name.upper()}_"
        service_dir = self.data_dir
        if name != "api" and self.count(name) > 1:
            # Two runners must never share a scratch/work directory; nor two storage services their
            # spool. API replicas do share theirs: the database and the token signing key live there.
            service_dir = self.data_dir / self.label(name, index)
        env = dict(os.environ)
        env.update({
            f"{prefix}NATS_URL": self.nats_url,
            f"{prefix}DATA_DIR": str(service_dir),
            f"{prefix}MODE": "embedded",
            f"{prefix}STREAM_REPLICAS": str(self.stream_replicas),
            "PYTHONUNBUFFERED": "1",
        })
        if self.nats_permissions:
            user = NATS_USERS[name]
            env.update({f"{prefix}NATS_USER": user, f"{prefix}NATS_PASSWORD": nats_passwords(self.data_dir)[user]})
        if name == "api":
            env.update({f"{prefix}PORT": str(self._api_port(index)), f"{prefix}HOST": self.api_host})
        elif name == "tracker":
            env[f"{prefix}TRACKING_URI"] = self.tracking_uri
        elif name == "storage":
            env[f"{prefix}BACKEND"] = self.storage_backend
            if self.storage_backend == "local":
                env[f"{prefix}ROOT"] = str(self.data_dir / "storage")
            env.update(self.storage_env)
        elif name == "runner" and "VISIONYARD_RUNNER_TRAINER_ENVS" not in env:
            from visionyard.cli.trainer_envs import runner_setting  # the envs `make trainer-env` built

            env["VISIONYARD_RUNNER_TRAINER_ENVS"] = runner_setting()
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, *, label: str, index: int = 1) -> ServiceProcess:
        log_path = self.logs_dir / f"{label}.log"
        service = ServiceProcess(name=label, process=self._launch(name, label=label, index=index),
                                 log_path=log_path, kind=name, index=index,
                                 record=RestartRecord(policy=self.restart_policy))
        service.record.started(time.monotonic())
        self.services.append(service)
        return service

    def _launch(self, kind: str, *, label: str, index: int) -> subprocess.Popen[bytes]:
        """Start one process of `kind`, appending to its log; it dies when this process dies."""
        log_path = self.logs_dir / f"{label}.log"
        if kind == "mlflow-ui":
            env = dict(os.environ)
            # Without this MLflow's UI starts a job runner that takes ~20 s and 1.5 GB more (NOTES.md).
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
            command = _resolve(self.mlflow_ui_command)
            # SIGTERM, not SIGKILL: `mlflow ui` runs its web server as a child and forwards SIGTERM to
            # it; killed outright it would leave that server orphaned.
            argv, preexec = dying_with_parent(command, signal_name="TERM")
        else:
            env = self._env_for(kind, index=index)
            command = _resolve(self.service_commands[kind])
            # SIGKILL: every service is built to survive a kill -9 without losing data. A service's own
            # children are its business (the runner gives each trainer a death signal of its own).
            argv, preexec = dying_with_parent(command)
        self.echo(f"starting {label}: {' '.join(command)} (log: {log_path})")
        with log_path.open("ab") as log_file:
            # A new session makes the service the leader of its own process group: Ctrl-C in the
            # terminal reaches only us, and we stop services in order and can kill a whole group.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.data_dir, start_new_session=True, preexec_fn=preexec)

    def _start_mlflow_ui(self) -> None:
        assert self.mlflow_ui_port is not None
        ensure_port_free(self.mlflow_ui_port, what="MLflow UI")
        process = self._launch("mlflow-ui", label="mlflow-ui", index=1)
        self.mlflow_ui = ServiceProcess(name="mlflow-ui", process=process, log_path=self.logs_dir / "mlflow-ui.log",
                                        kind="mlflow-ui", record=RestartRecord(policy=self.restart_policy))
        self.mlflow_ui.record.started(time.monotonic())

    def dead_services(self) -> list[ServiceProcess]:
        """Services whose process has exited."""
        return [service for service in self.services if service.process.poll() is not None]

    def _wait_ready(self, api_urls: Sequence[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        waiting = list(api_urls)
        with httpx.Client(timeout=2.0) as http:
            while True:
                dead = self.dead_services()
                if dead:
                    raise StackError(self.describe_exit(dead[0]))
                try:
                    waiting = [url for url in waiting if http.get(f"{url}/health/ready").status_code != 200]
                except httpx.HTTPError:
                    pass
                # Re-check after readiness: a service that died meanwhile must not be reported as up.
                if not waiting and not self.dead_services():
                    return
                if time.monotonic() > deadline:
                    log_name = f"{self.label('api', api_urls.index(waiting[0]) + 1)}.log"
                    raise StackError(
                        f"the API at {waiting[0]} was not ready after {self.ready_timeout:.0f}s; "
                        f"logs are in {self.logs_dir}\n--- {log_name} (tail) ---\n"
                        f"{log_tail(self.logs_dir / log_name)}"
                    )
                time.sleep(0.2)

    def _wait_mlflow_server(self) -> None:
        assert self.mlflow_ui is not None
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self.mlflow_ui.process.poll() is not None:
                    raise StackError(self.describe_exit(self.mlflow_ui))
                try:
                    if http.get(f"{self.tracking_uri}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"the MLflow server at {self.tracking_uri} did not answer after "
                                     f"{self.ready_timeout:.0f}s\n{log_tail(self.mlflow_ui.log_path)}")
                time.sleep(0.2)

    def describe_exit(self, service: ServiceProcess) -> str:
        """A message naming a dead service, its exit code and the tail of its log."""
        return (f"service {service.name} exited with code {service.process.returncode}; "
                f"last lines of {service.log_path}:\n{log_tail(service.log_path)}")

    def stop(self) -> None:
        """Stop services in reverse start order, then the MLflow UI/server and nats-server; idempotent."""
        # The MLflow server goes after the services: several trackers write through it until they stop.
        owned = [*([self.mlflow_ui] if self.mlflow_ui is not None else []), *self.services]
        for service in reversed(owned):
            self.echo(f"stopping {service.name}")
            _stop_group(service.process, timeout=self.stop_timeout)
            code = service.process.returncode
            if code not in (0, -signal.SIGTERM):
                self.echo(f"{service.name} exited with code {code}; see {service.log_path}")
        self.services.clear()
        self.mlflow_ui = None
        if self.nats is not None:
            self.echo("stopping nats-server")
            self.nats.stop()
            self.nats = None
        if self.nats_cluster is not None:
            self.echo("stopping the NATS cluster")
            self.nats_cluster.stop()
            self.nats_cluster = None
        if self._state_written:
            self.state_file.unlink(missing_ok=True)
            self._state_written = False

    # Supervision
    def service(self, label: str) -> ServiceProcess:
        """The service named `label` (`api`, `tracker`, `storage`, `runner`, or `<kind>-N` for replicas)."""
        for service in self.services:
            if service.name == label:
                return service
        raise KeyError(f"no service {label!r}; running: {[s.name for s in self.services]}")

    def _supervised(self) -> list[ServiceProcess]:
        return [*self.services, *([self.mlflow_ui] if self.mlflow_ui is not None else [])]

    def _warn(self, message: str) -> None:
        (self.report or self.echo)(message)

    def tend(self) -> float:
        """Restart what exited once its backoff is up, report crash loops; seconds until the next restart is due.

        Call it whenever a child may have exited (SIGCHLD) and when the returned delay has passed.
        """
        now = time.monotonic()
        changed = False
        next_due = float("inf")
        if self.nats is not None and self.nats.process is not None:
            changed |= self._tend_nats(now)
            if self.nats_record.restart_at is not None:
                next_due = min(next_due, self.nats_record.restart_at - now)
        for service in self._supervised():
            record = service.record
            code = service.process.poll()
            if code is None:
                if record.recovered(now):
                    self._warn(f"{service.name} has stayed up for {self.restart_policy.stable_after:.0f}s: "
                               f"no longer crash-looping")
                    changed = True
                continue
            if not record.waiting:
                self._note_exit(service.name, record, code=code, now=now, log_path=service.log_path)
                changed = True
            if record.due(now):
                # The leader is gone; whatever it left in its group must not run beside its successor.
                _stop_group(service.process, timeout=self.stop_timeout)
                record.restarting(now)
                service.process = self._launch(service.kind, label=service.name, index=service.index)
                changed = True
            else:
                assert record.restart_at is not None
                next_due = min(next_due, record.restart_at - now)
        if changed:
            self.write_state()
        return max(next_due, 0.0)

    def _tend_nats(self, now: float) -> bool:
        assert self.nats is not None and self.nats.process is not None
        record = self.nats_record
        if self.nats.process.poll() is None:
            if record.recovered(now):
                self._warn("nats-server has stayed up again: no longer crash-looping")
                return True
            return False
        log_path = self.logs_dir / "nats-server.log"
        if not record.waiting:
            self._note_exit("nats-server", record, code=self.nats.process.returncode, now=now, log_path=log_path)
        if not record.due(now):
            return True
        record.restarting(now)
        try:
            # Same ports and store: clients reconnect on their own, JetStream recovers its file store.
            self.nats.start()
        except (RuntimeError, TimeoutError, OSError) as error:
            self._warn(f"nats-server did not come back: {error}")
            self._note_exit("nats-server", record, code=self.nats.process.returncode, now=time.monotonic(),
                            log_path=log_path)
        return True

    def _note_exit(self, name: str, record: RestartRecord, *, code: int | None, now: float, log_path: Path) -> None:
        looping = record.exited(code=code, now=now)
        assert record.restart_at is not None
        delay = record.restart_at - now
        if looping:
            policy = self.restart_policy
            self._warn(
                f"{name} is crash-looping: it exited {len(record.exits)} times in the last "
                f"{policy.crash_loop_window:.0f}s (last exit code {code}, {record.restarts} restarts so far). "
                f"The rest of the stack keeps running; {name} is retried every {policy.max_delay:.0f}s at most "
                f"(next in {delay:.1f}s). Last lines of {log_path}:\n{log_tail(log_path, lines=20)}"
            )
        else:
            self._warn(f"{name} exited with code {code}; restarting it in {delay:.1f}s (log: {log_path})")

    def state(self) -> StackState:
        """What `visionyard status` shows: this process and each supervised one."""
        processes = []
        if self.nats is not None and self.nats.process is not None:
            processes.append(self._process_state("nats-server", self.nats.process, self.nats_record,
                                                 self.logs_dir / "nats-server.log"))
        for service in self._supervised():
            processes.append(self._process_state(service.name, service.process, service.record, service.log_path))
        return StackState(
            pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()), started_at=self.started_at,
            data_dir=str(self.data_dir), api_url=self.api_url,
            nats_url=self.nats_url if self.nats or self.nats_cluster else "",
            tracking_uri=self.tracking_uri, logs_dir=str(self.logs_dir), processes=processes,
        )

    @staticmethod
    def _process_state(name: str, process: subprocess.Popen[bytes], record: RestartRecord,
                       log_path: Path) -> ProcessState:
        running = process.returncode is None and not record.waiting
        wall = time.time() - time.monotonic()  # the records keep monotonic times
        return ProcessState(
            name=name, state=record.state(), pid=process.pid if running else None,
            start_ticks=process_start_ticks(process.pid) if running else None, restarts=record.restarts,
            log=str(log_path), last_exit_code=record.last_exit_code,
            last_exit_at=None if record.last_exit_at is None else record.last_exit_at + wall,
        )

    def write_state(self) -> None:
        """Rewrite `<data-dir>/stack.json`."""
        write_state(self.state_file, self.state())
        self._state_written = True

    def pids(self) -> list[int]:
        """Pids of every process this stack started and still tracks (services and nats-server)."""
        found = [service.pid for service in self.services]
        if self.mlflow_ui is not None:
            found.append(self.mlflow_ui.pid)
        if self.nats is not None and self.nats.process is not None:
            found.append(self.nats.process.pid)
        if self.nats_cluster is not None:
            found += self.nats_cluster.pids()
        return found


def _stop_group(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM the process group, wait up to `timeout`, then SIGKILL whatever is left of the group."""
    group = process.pid
    if process.poll() is None:
        _signal_group(group, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            process.wait()
    # The leader may have exited leaving children in its group; they must not outlive the stack.
    _signal_group(group, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: wait (bounded) so "stopped" really means gone.
    deadline = time.monotonic() + 5.0
    while _live_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.02)


def _live_group_members(group: int) -> list[int]:
    """Pids of non-zombie processes in process group `group` (Linux /proc; [] elsewhere)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.parent.name))
    return members


def _signal_group(group: int, signum: signal.Signals) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass
