"""The `visionyard` command line: parse arguments, run one command, turn errors into exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from visionyard.cli.client import ApiClient, ApiError, ApiUnreachable, websocket_url
from visionyard.cli.stack import EmbeddedStack, StackError
from visionyard.cli.stackstate import describe_status, read_state, state_path

DEFAULT_API = "http://127.0.0.1:8000"


def _api_default() -> str:
    # The one place the CLI reads the environment: a default for --api that scripts can set once.
    return os.environ.get("VISIONYARD_API_URL", DEFAULT_API)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="visionyard", description="Train, track and ship vision models.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the embedded stack (nats-server + the four services) in the foreground")
    up.add_argument("--data-dir", type=Path, default=Path(".data"), help="where all state lives (default ./.data)")
    up.add_argument("--api-port", type=int, default=8000)
    up.add_argument("--nats-port", type=int, default=0, help="default: a free port")
    up.add_argument("--runners", type=int, default=1, help="number of trainer-runner processes")
    up.add_argument("--storage-backend", choices=("local", "s3"), default="local")
    up.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, R2, moto); default AWS")
    up.add_argument("--s3-region", help="S3 region (default us-east-1)")
    up.add_argument("--external-bucket", help="bucket for datasets and exports (default visionyard-external)")
    up.add_argument("--internal-bucket", help="bucket for checkpoints (default visionyard-internal)")
    up.add_argument("--mlflow-ui", action="store_true", help="also start `mlflow ui`")
    up.add_argument("--mlflow-port", type=int, default=5000, help="port of the MLflow UI (default 5000)")
    up.add_argument("--trainer-dir", type=Path, action="append", default=[], dest="trainer_dirs", metavar="DIR",
                    help="a trainer directory written for the original platform (train.py + capabilities.json); "
                         "repeatable")

    status = commands.add_parser("status", help="show the state, restarts and pid of each process `up` runs")
    status.add_argument("--data-dir", type=Path, default=Path(".data"), help="the data directory `up` was given")
    status.add_argument("--json", action="store_true", help="print the recorded state as JSON")

    datasets = commands.add_parser("datasets", help="manage datasets")
    dataset_commands = datasets.add_subparsers(dest="dataset_command", required=True)
    upload = dataset_commands.add_parser("upload", help="upload a zip or a folder and wait until it is checked")
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", required=True)
    upload.add_argument("--description")
    upload.add_argument("--api", default=_api_default())
    upload.add_argument("--timeout", type=float, default=300.0)

    train = commands.add_parser("train", help="create and start a training job, then watch it")
    train.add_argument("--dataset-id", required=True)
    train.add_argument("--model", default="simple_cnn")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=0.001)
    train.add_argument("--framework", default="pytorch")
    train.add_argument("--task", default="image_classification")
    train.add_argument("--experiment-name")
    train.add_argument("--priority", default="normal", help="low, normal, high or an integer (higher starts first)")
    train.add_argument("--no-watch", action="store_true")
    train.add_argument("--api", default=_api_default())

    queue = commands.add_parser("queue", help="show the queues: waiting and running jobs by project and priority")
    queue.add_argument("--job", help="show where this job stands instead (position, reason, estimate)")
    queue.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    queue.add_argument("--api", default=_api_default())

    watch = commands.add_parser("watch", help="follow a training job's progress live")
    watch.add_argument("job_id")
    watch.add_argument("--api", default=_api_default())

    demo = commands.add_parser("demo", help="start everything, train on scikit-learn digits, show the results")
    demo.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary directory")
    demo.add_argument("--task", choices=("classification", "detection"), default="classification",
                      help="classification: a CNN on digits; detection: YOLO on synthetic shapes (needs make trainer-env)")
    demo.add_argument("--epochs", type=int, default=None, help="default: 5 (classification), 25 (detection)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    return parser


def _admin_login(data_dir: Path) -> tuple[str, str] | None:
    """The first admin's generated login, which the API writes in embedded mode (None when it was configured)."""
    path = data_dir / "auth" / "admin-login.json"
    try:
        login = json.loads(path.read_text(encoding="utf-8"))
        return str(login["email"]), str(login["password"])
    except (OSError, ValueError, KeyError):
        return None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ignore_signals() -> None:
    # While stopping the stack a second Ctrl-C must not abandon half-stopped services.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def trainer_dirs_env(directories: list[Path]) -> dict[str, str]:
    """`VISIONYARD_RUNNER_TRAINER_DIRS` for the runners: the `--trainer-dir`s after any already set."""
    if not directories:
        return {}
    for directory in directories:
        if not (directory / "train.py").is_file() or not (directory / "capabilities.json").is_file():
            raise SystemExit(f"--trainer-dir {directory}: needs train.py and capabilities.json")
    existing = [part for part in os.environ.get("VISIONYARD_RUNNER_TRAINER_DIRS", "").split(os.pathsep) if part]
    return {"VISIONYARD_RUNNER_TRAINER_DIRS": os.pathsep.join([*existing, *(str(d.resolve()) for d in directories)])}


class StopSignals:
    """SIGINT/SIGTERM ask `up` to stop; SIGCHLD wakes its supervisor; both through a self-pipe.

    The handlers are installed explicitly: a script that starts `up` in the background hands it SIGINT
    ignored, and Python then installs no handler of its own. During start-up a stop request raises
    KeyboardInterrupt (start-up is one blocking call); afterwards it only sets `requested`, so it never
    lands in the middle of a restart. Waking goes through `signal.set_wakeup_fd` rather than a lock
    (a handler taking a lock the interrupted code holds would deadlock).
    """

    def __init__(self) -> None:
        self.requested = False
        self.raise_on_stop = True
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_stop)
        # A no-op handler: the byte written to the wake-up fd is what wakes `wait`.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.raise_on_stop:
            raise KeyboardInterrupt

    def wait(self, timeout: float) -> None:
        """Until a signal arrives or `timeout` seconds pass."""
        if not self.requested:
            select.select([self._read], [], [], timeout)
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Restore the wake-up fd and the default SIGCHLD disposition."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


def cmd_up(args: argparse.Namespace) -> int:
    """Run and supervise the embedded stack until Ctrl-C / SIGTERM."""
    storage_env = {
        f"VISIONYARD_STORAGE_{key.upper()}": value
        for key, value in (("s3_endpoint_url", args.s3_endpoint_url), ("s3_region", args.s3_region),
                           ("external_bucket", args.external_bucket), ("internal_bucket", args.internal_bucket))
        if value
    }
    stack = EmbeddedStack(
        data_dir=args.data_dir, api_port=args.api_port, nats_port=args.nats_port, runners=args.runners,
        storage_backend=args.storage_backend, storage_env=storage_env,
        mlflow_ui_port=args.mlflow_port if args.mlflow_ui else None, echo=print,
        extra_env=trainer_dirs_env(args.trainer_dirs),
        report=lambda line: print(line, file=sys.stderr, flush=True),
    )
    signals = StopSignals()
    try:
        stack.start()
        assert stack.nats is not None
        print()
        print(f"Visionyard is running (data in {stack.data_dir})")
        print(f"  API:          {stack.api_url}")
        print(f"  API docs:     {stack.docs_url}")
        print(f"  NATS:         {stack.nats.url}")
        if stack.nats_permissions:
            print(f"  NATS users:   {stack.nats_auth_config.parent / 'passwords.json'} (one per service; "
                  f"`admin` for tools)")
        print(f"  MLflow store: {stack.tracking_uri}")
        if stack.mlflow_ui_url:
            print(f"  MLflow UI:    {stack.mlflow_ui_url} (takes a few seconds to start)")
        else:
            print(f"  MLflow UI:    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {' '.join(stack.mlflow_ui_command)}")
        print(f"  logs:         {stack.logs_dir}")
        login = _admin_login(stack.data_dir)
        if login:
            print(f"  admin login:  {login[0]} / {login[1]} (generated on first start; change it under /auth/me)")
        print(f"  status:       visionyard status --data-dir {stack.data_dir}")
        print("Press Ctrl-C to stop.", flush=True)
        signals.raise_on_stop = False
        while not signals.requested:
            # Woken by SIGCHLD when a process exits; the bound re-checks crash-loop recovery.
            signals.wait(min(stack.tend(), 5.0))
        print("\nstopping Visionyard", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopping Visionyard", flush=True)
        return 0
    except StackError as error:
        print(f"visionyard up: {error}", file=sys.stderr)
        return 1
    finally:
        _ignore_signals()
        signals.close()
        stack.stop()


def cmd_status(args: argparse.Namespace) -> int:
    """Print each process of the stack `up` runs in --data-dir: state, pid, restarts (exit 3: no stack)."""
    state = read_state(state_path(args.data_dir))
    text, code = describe_status(state, args.data_dir)
    if args.json:
        document = {"running": code != 3, **(state.to_json() if state is not None else {})}
        if state is not None:
            for entry, process in zip(document["processes"], state.processes, strict=True):
                entry["alive"] = process.alive
        print(json.dumps(document, indent=2))
    else:
        print(text)
    return code


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    """Upload a dataset and report its statistics or why it was rejected."""
    from visionyard.cli.dataset_upload import describe_dataset, upload_dataset

    with ApiClient(args.api) as client:
        outcome = upload_dataset(client, args.path, name=args.name, description=args.description,
                                 timeout=args.timeout)
    if outcome.ready:
        print(describe_dataset(outcome.dataset))
        return 0
    print(f"dataset {outcome.dataset_id} was rejected: {outcome.reason}", file=sys.stderr)
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    """Create and start a job, then watch it unless --no-watch."""
    from visionyard.cli.training import create_and_start_job, training_config

    config = training_config(dataset_id=args.dataset_id, model=args.model, epochs=args.epochs,
                             batch_size=args.batch_size, learning_rate=args.lr, framework=args.framework,
                             task_type=args.task)
    with ApiClient(args.api) as client:
        job = create_and_start_job(client, config, experiment_name=args.experiment_name, priority=args.priority)
    job_id = str(job["id"])
    print(f"job {job_id} is {job.get('status')}", flush=True)
    if args.no_watch:
        print(job_id)
        return 0
    return _watch(args.api, job_id)


def _watch(api: str, job_id: str) -> int:
    from visionyard.cli.watch import watch_job

    outcome = asyncio.run(watch_job(websocket_url(api), job_id))
    return 0 if outcome.succeeded else 1


def cmd_queue(args: argparse.Namespace) -> int:
    """Print the queues (or one job's place in them)."""
    from visionyard.cli.queues import show_job, show_queues

    with ApiClient(args.api) as client:
        if args.json:
            path = f"/api/v1/training/jobs/{args.job}" if args.job else "/api/v1/queues"
            print(json.dumps(client.request("GET", path), indent=2))
        else:
            print(show_job(client, args.job) if args.job else show_queues(client))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a job until it ends; 0 when it completed."""
    return _watch(args.api, args.job_id)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo."""
    from visionyard.cli.demo import run_demo

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.task == "detection":
            from visionyard.cli.detection_demo import DEFAULT_EPOCHS, run_detection_demo

            return run_detection_demo(data_dir=args.data_dir, epochs=args.epochs or DEFAULT_EPOCHS, keep=args.keep)
        return run_demo(data_dir=args.data_dir, epochs=args.epochs or 5, keep=args.keep)
    except KeyboardInterrupt:
        # run_demo's finally has already stopped the stack.
        print("demo interrupted", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `visionyard` console script."""
    args = build_parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "status": cmd_status,
        "train": cmd_train,
        "watch": cmd_watch,
        "queue": cmd_queue,
        "demo": cmd_demo,
        "datasets": cmd_datasets_upload,
    }
    try:
        code = handlers[args.command](args)
    except (ApiError, ApiUnreachable, StackError, FileNotFoundError, TimeoutError, ConnectionError,
            PermissionError) as error:
        print(f"visionyard {args.command}: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
