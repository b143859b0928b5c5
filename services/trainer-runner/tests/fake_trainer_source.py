"""Source of a tiny synthetic trainer the runner tests spawn (written to a temp dir as `vy_fake_trainer`).

Its behaviour is chosen by `advanced_config.behaviour`: `ok`, `crash`, `user_error`, `forever`
(reports an epoch every 0.1 s and ignores SIGTERM, so only SIGKILL ends it), `grandchild` (starts a
sleeping child in its group, then runs forever).
"""

SOURCE = r'''
import os, signal, subprocess, sys, time
from pathlib import Path
from visionyard.shared.sdk import Reporter, load_job

job = load_job()
reporter = Reporter.from_env(outbox_dir=job.outbox_dir)
behaviour = (job.config.advanced_config or {}).get("behaviour", "ok")
print("fake trainer starting", flush=True)
if behaviour == "crash":
    print("Traceback: something exploded", file=sys.stderr, flush=True)
    sys.exit(1)
if behaviour == "user_error":
    print("error: the dataset has no classes", file=sys.stderr, flush=True)
    sys.exit(2)
if behaviour in ("forever", "grandchild"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path("grandchild.pid").write_text(str(child.pid))
    epoch = 0
    while True:
        epoch += 1
        reporter.progress(epoch, 10_000, {"loss": 1.0 / epoch})
        time.sleep(0.1)
job.output_dir.mkdir(parents=True, exist_ok=True)
for epoch in (1, 2):
    reporter.progress(epoch, 2, {"loss": 1.0 / epoch, "accuracy": 0.5 * epoch})
    path = job.output_dir / "last.pt"
    path.write_bytes(os.urandom(1000) + bytes([epoch]))
    reporter.checkpoint(path, kind="last", epoch=epoch)
reporter.log("done", event_type="custom")
reporter.result(final_metrics={"accuracy": 1.0}, best_metrics={"accuracy": 1.0}, best_epoch=2, epochs_completed=2)
'''
