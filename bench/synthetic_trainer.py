"""A synthetic trainer the benchmarks register with the runner (`python -m bench.synthetic_trainer`).

It speaks the SDK's JSON-line protocol directly and imports nothing heavy, so what the benchmarks
measure is the platform, not a model. `advanced_config` chooses what it does: `events` progress
events (`rate` per second, 0 = as fast as it can), after `warmup` seconds; an optional checkpoint of
`checkpoint_mb` MB; with `epoch_checkpoint_kb`, a `last` checkpoint of that size after every progress
event and a `best` one after every other, as a real trainer saves them. Each progress event carries `t_emit` (wall clock at emit) and `t_spawned` (the
first statement of this process) in its metrics, so receivers can measure latency and dispatch.
"""

import time

SPAWNED = time.time()  # before any other import: dispatch excludes the trainer's own imports

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    """Emit what the job's advanced_config asks for, then a result, and exit 0."""
    with open(os.environ["VISIONYARD_JOB_FILE"]) as handle:
        job = json.load(handle)
    advanced = job["config"].get("advanced_config") or {}
    events = int(advanced.get("events", 1))
    rate = float(advanced.get("rate", 0))
    warmup = float(advanced.get("warmup", 0))
    checkpoint_mb = int(advanced.get("checkpoint_mb", 0))
    epoch_checkpoint_kb = int(advanced.get("epoch_checkpoint_kb", 0))
    outbox = job["outbox_dir"]
    os.makedirs(outbox, exist_ok=True)
    fd = os.environ.get("VISIONYARD_EVENTS_FD")
    sink = os.fdopen(int(fd), "w", buffering=1 << 16) if fd else sys.stderr
    if warmup:
        time.sleep(warmup)
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    for index in range(1, events + 1):
        if interval:
            # Pace against the schedule, not the previous emit, so the rate holds on average.
            delay = start + index * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        now = time.time()
        record = {"type": "progress", "epoch": index, "total_epochs": events, "step": None, "ts": now,
                  "metrics": {"loss": 1.0 / index, "t_emit": now, "t_spawned": SPAWNED}}
        sink.write(json.dumps(record, separators=(",", ":")) + "\n")
        if epoch_checkpoint_kb:
            for kind in ("last", "best") if index % 2 else ("last",):
                # A fresh file per declaration, as the SDK's copy into the outbox makes.
                path = os.path.join(outbox, f"{index}-{kind}.pt")
                with open(path, "wb") as handle:
                    handle.write(os.urandom(epoch_checkpoint_kb << 10))
                sink.write(json.dumps({"type": "checkpoint", "kind": kind, "path": path, "epoch": index,
                                       "ts": time.time()}) + "\n")
        if interval:
            sink.flush()
    if checkpoint_mb:
        path = os.path.join(outbox, "best.pt")
        block = os.urandom(1 << 20)
        with open(path, "wb") as handle:
            for _ in range(checkpoint_mb):
                handle.write(block)
        now = time.time()
        sink.write(json.dumps({"type": "log", "message": "checkpoint", "event_type": "bench_checkpoint",
                               "data": {"t_declared": now}, "ts": now}) + "\n")
        sink.write(json.dumps({"type": "checkpoint", "kind": "best", "path": path, "epoch": events, "ts": now}) + "\n")
    sink.write(json.dumps({"type": "result", "final_metrics": {"loss": 0.0}, "best_metrics": {},
                           "best_epoch": events, "epochs_completed": events, "ts": time.time()}) + "\n")
    sink.flush()


if __name__ == "__main__":
    main()
