"""EmbeddedStack with a real nats-server and fake service commands: start, readiness, failure, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from visionyard.cli.stack import EmbeddedStack, StackError, admin_nats_url, nats_passwords
from visionyard.cli.stackstate import describe_status, read_state
from visionyard.cli.supervision import RestartPolicy
from visionyard.shared.natsserver import free_port

pytestmark = pytest.mark.integration

# A stand-in service: records its env, spawns a child in its own process group (like a trainer
# would be, if it forgot to make its own), serves /health/ready when it is the api, exits 0 on SIGTERM.
FAKE_SERVICE = textwrap.dedent(
    """
    import http.server, json, os, signal, subprocess, sys, threading
    name, out_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {k: v for k, v in os.environ.items() if k.startswith("VISIONYARD_")}
    with open(os.path.join(out_dir, f"{name}-{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "child": child.pid, "env": env}, f)
    print(name, "started", flush=True)
    marker = os.path.join(out_dir, f"{name}.started-once")
    if mode == "crashloop" and os.path.exists(marker):
        print("cannot open the store: boom", flush=True)
        sys.exit(3)
    open(marker, "w").close()
    if mode == "die":
        print("cannot connect to the database: boom", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if name == "api":
        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health/ready" else 404)
                self.end_headers()
            def log_message(self, *args):
                pass
        port = int(os.environ["VISIONYARD_API_PORT"])
        http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
    threading.Event().wait()
    """
)


def alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (our fakes and nats-server do)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = entry.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in command and alive(int(entry.parent.name)):
            found.append(command)
    return found


def fake_commands(tmp_path: Path, modes: dict[str, str] | None = None) -> dict[str, list[str]]:
    script = tmp_path / "fake_service.py"
    script.write_text(FAKE_SERVICE)
    out = tmp_path / "records"
    out.mkdir(exist_ok=True)
    modes = modes or {}
    return {name: [sys.executable, str(script), name, str(out), modes.get(name, "ok")]
            for name in ("api", "tracker", "storage", "runner")}


def records(tmp_path: Path) -> dict[str, dict]:
    """What each fake service recorded, by `<name>-<pid>`."""
    return {path.stem: json.loads(path.read_text()) for path in (tmp_path / "records").glob("*.json")}


def wait_for_records(tmp_path: Path, count: int) -> dict[str, dict]:
    """Records once `count` services have written theirs (they start concurrently with readiness)."""
    for _ in range(400):
        found = records(tmp_path)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return records(tmp_path)


def by_name(started: dict[str, dict], name: str) -> dict:
    return next(record for key, record in started.items() if key.startswith(f"{name}-"))


def test_starts_nats_and_services_then_stops_everything(tmp_path: Path) -> None:
    stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=free_port(), runners=2,
                          service_commands=fake_commands(tmp_path, {"storage": "stubborn"}),
                          ready_timeout=30, stop_timeout=1)
    with stack:
        assert stack.nats is not None and stack.nats.process is not None
        nats_url = stack.nats.url
        monitor = f"http://127.0.0.1:{stack.nats.monitor_port}/healthz"
        with urllib.request.urlopen(monitor, timeout=2) as reply:
            assert reply.status == 200
        # a Ctrl-C in the terminal must reach only `visionyard up`, which stops the others in order
        assert os.getpgid(stack.nats.process.pid) != os.getpgrp()
        assert all(os.getpgid(service.pid) == service.pid for service in stack.services)
        started = wait_for_records(tmp_path, 5)
        tracked = stack.pids()
        assert sorted(key.split("-")[0] for key in started) == ["api", "runner", "runner", "storage", "tracker"]
        assert [service.name for service in stack.services] == ["tracker", "storage", "api", "runner-1", "runner-2"]

    # every service was pointed at the stack's own broker, in embedded mode, with its logs on disk
    api_env = by_name(started, "api")["env"]
    assert api_env["VISIONYARD_API_NATS_URL"] == nats_url
    assert api_env["VISIONYARD_API_MODE"] == "embedded"
    assert by_name(started, "tracker")["env"]["VISIONYARD_TRACKER_TRACKING_URI"] == stack.tracking_uri
    assert by_name(started, "storage")["env"]["VISIONYARD_STORAGE_ROOT"] == str(stack.data_dir / "storage")
    assert (stack.logs_dir / "runner-2.log").read_text().startswith("runner started")
    # nothing survives: services, the SIGTERM-ignoring one, their children, nats-server
    survivors = [pid for pid in tracked + [r["child"] for r in started.values()] if alive(pid)]
    assert survivors == []
    assert processes_mentioning(tmp_path) == []


def test_a_service_that_dies_at_startup_is_named_with_its_log_and_nothing_is_left(tmp_path: Path) -> None:
    stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=free_port(),
                          service_commands=fake_commands(tmp_path, {"api": "die"}), ready_timeout=30,
                          stop_timeout=2)

    try:
        with pytest.raises(StackError) as raised:
            stack.start()
    finally:
        stack.stop()  # a failing test must not leave a stack behind either

    message = str(raised.value)
    assert "api exited with code 3" in message
    assert "cannot connect to the database: boom" in message
    started = records(tmp_path)
    assert [pid for r in started.values() for pid in (r["pid"], r["child"]) if alive(pid)] == []
    assert processes_mentioning(tmp_path) == []  # nats-server (its store is under tmp_path) is gone too


def test_refuses_when_the_api_port_is_taken_without_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=port, service_commands=fake_commands(tmp_path))

        try:
            with pytest.raises(StackError, match=f"port {port} .* already in use"):
                stack.start()
        finally:
            stack.stop()

    assert records(tmp_path) == {}
    assert not (tmp_path / "data" / "nats").exists() and not (tmp_path / "data" / "logs").exists()


def tend_until(stack: EmbeddedStack, done: Callable[[], bool], *, bound: float = 30.0) -> None:
    """Run the supervisor as `up` does, sleeping only the delays it asks for, until `done()`."""
    deadline = time.monotonic() + bound
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there"
        time.sleep(min(stack.tend(), 0.5))


def api_ready(stack: EmbeddedStack) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.api_url}/health/ready", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def test_a_killed_service_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=free_port(), runners=2,
                          service_commands=fake_commands(tmp_path), ready_timeout=30, stop_timeout=2,
                          restart_policy=RestartPolicy(first_delay=0.05))
    with stack:
        assert stack.nats is not None and stack.nats.process is not None
        # Every service has started (readiness waits for the API only): the kill hits a runner that ran.
        wait_for_records(tmp_path, 5)
        before = {service.name: service.pid for service in stack.services}
        runner = stack.service("runner-2")
        os.kill(runner.pid, signal.SIGKILL)
        runner.process.wait()
        os.kill(stack.nats.process.pid, signal.SIGKILL)
        stack.nats.process.wait()
        tend_until(stack, lambda: runner.process.poll() is None and runner.record.restarts == 1
                   and stack.nats_record.restarts == 1)

        after = {service.name: service.pid for service in stack.services}
        assert after["runner-2"] != before["runner-2"] and alive(after["runner-2"])
        assert {k: v for k, v in after.items() if k != "runner-2"} == {k: v for k, v in before.items() if k != "runner-2"}
        assert api_ready(stack)
        state = read_state(stack.state_file)
        assert state is not None
        shown = {p.name: (p.state, p.pid, p.restarts, p.last_exit_code) for p in state.processes}
        assert shown["runner-2"] == ("running", after["runner-2"], 1, -signal.SIGKILL)
        assert shown["nats-server"] == ("running", stack.nats.process.pid, 1, -signal.SIGKILL)
        assert shown["api"] == ("running", after["api"], 0, None)
        # the restarted runner appended to its log; the broker came back on the same port
        assert (stack.logs_dir / "runner-2.log").read_text().count("runner started") == 2
        assert stack.nats.url == state.nats_url
    assert not stack.state_file.exists()


def test_a_crash_looping_service_is_reported_and_retried_while_the_rest_serves(tmp_path: Path) -> None:
    reports: list[str] = []
    policy = RestartPolicy(first_delay=0.05, max_delay=0.2, crash_loop_exits=3, crash_loop_window=60)
    stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=free_port(),
                          service_commands=fake_commands(tmp_path, {"storage": "crashloop"}), ready_timeout=30,
                          stop_timeout=2, restart_policy=policy, report=reports.append)
    with stack:
        # Every service has started (readiness waits for the API only): storage ran once, so it crash-loops now.
        wait_for_records(tmp_path, 4)
        before = {service.name: service.pid for service in stack.services}
        storage = stack.service("storage")
        os.kill(storage.pid, signal.SIGKILL)  # from now on it exits at once with code 3
        tend_until(stack, lambda: any("crash-looping" in line for line in reports))

        report = next(line for line in reports if "crash-looping" in line)
        assert report.startswith("storage is crash-looping: it exited 3 times")
        assert "last exit code 3" in report and "cannot open the store: boom" in report
        assert "The rest of the stack keeps running" in report
        others = {s.name: s.pid for s in stack.services if s.name != "storage"}
        assert others == {k: v for k, v in before.items() if k != "storage"} and all(map(alive, others.values()))
        assert api_ready(stack)
        text, code = describe_status(read_state(stack.state_file), stack.data_dir)
        assert code == 1 and any(line.split()[:2] == ["storage", "crash-looping"] for line in text.splitlines())
        # not parked: it keeps being retried at the capped delay
        tried = storage.record.restarts
        tend_until(stack, lambda: storage.record.restarts >= tried + 2)
        assert len([line for line in reports if "crash-looping" in line]) == 1, "reported once, not every retry"


def test_a_scaled_out_stack_runs_replicas_on_a_nats_cluster(tmp_path: Path) -> None:
    stack = EmbeddedStack(data_dir=tmp_path / "data", api_port=free_port(), runners=2, nats_nodes=3,
                          replicas={"api": 2, "storage": 2}, service_commands=fake_commands(tmp_path),
                          ready_timeout=30, stop_timeout=2)
    with stack:
        assert stack.nats is None and stack.nats_cluster is not None
        assert [service.name for service in stack.services] == [
            "tracker", "storage-1", "storage-2", "api-1", "api-2", "runner-1", "runner-2"]
        started = wait_for_records(tmp_path, 7)
        envs = {f"{record['env'].get('VISIONYARD_API_PORT', '')}{key.split('-')[0]}": record["env"]
                for key, record in started.items()}
        # Every service gets every node (it fails over when one goes) and declares the topology at R3.
        nodes = [node.url for node in stack.nats_cluster.nodes]
        for env in envs.values():
            prefix = next(key for key in env if key.endswith("_NATS_URL")).removesuffix("NATS_URL")
            assert env[f"{prefix}NATS_URL"].split(",") == nodes
            assert env[f"{prefix}STREAM_REPLICAS"] == "3"
        # Both API replicas answer, each on its own port, over one data directory (one database).
        assert len(set(stack.api_urls)) == 2 and all(
            urllib.request.urlopen(f"{url}/health/ready", timeout=2).status == 200 for url in stack.api_urls)
        api_dirs = {env["VISIONYARD_API_DATA_DIR"] for env in envs.values() if "VISIONYARD_API_DATA_DIR" in env}
        assert api_dirs == {str(stack.data_dir)}
        # Storage and runner replicas never share a scratch directory.
        storage_dirs = sorted(record["env"]["VISIONYARD_STORAGE_DATA_DIR"] for key, record in started.items()
                              if key.startswith("storage-"))
        assert storage_dirs == [str(stack.data_dir / "storage-1"), str(stack.data_dir / "storage-2")]
        tracked = stack.pids()
    assert [pid for pid in tracked if alive(pid)] == []
    assert processes_mentioning(tmp_path) == []


def test_replicas_name_only_what_can_be_replicated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replicas: 'runner' is not api, tracker or storage"):
        EmbeddedStack(data_dir=tmp_path, replicas={"runner": 2})
    with pytest.raises(ValueError, match="replicas: api needs at least one replica, got 0"):
        EmbeddedStack(data_dir=tmp_path, replicas={"api": 0})
    with pytest.raises(ValueError, match="nats_nodes: at least one, got 0"):
        EmbeddedStack(data_dir=tmp_path, nats_nodes=0)


def test_admin_url_names_the_admin_on_every_node_of_a_cluster(tmp_path: Path) -> None:
    password = nats_passwords(tmp_path)["admin"]
    url = admin_nats_url(tmp_path, "nats://127.0.0.1:4001,nats://127.0.0.1:4002")
    assert url == f"nats://admin:{password}@127.0.0.1:4001,nats://admin:{password}@127.0.0.1:4002"
