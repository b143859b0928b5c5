"""A trainer directory written for the original platform's SDK (trainer-contract.md), as its tests write it.

`train.py` uses only what that contract gives a trainer: argv `--log-level INFO`, the environment
variables, and `from trainer_sdk import TrainerSDK, ErrorType` (which it never ships itself). Pure Python:
it "trains" by counting the YOLO labels the SDK's DICE → YOLO conversion wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_PY = r'''
import argparse, json, os, sys, tempfile, traceback
from pathlib import Path

from trainer_sdk import ErrorType, TrainerSDK

parser = argparse.ArgumentParser()
parser.add_argument("--job-id"); parser.add_argument("--model-name"); parser.add_argument("--dataset-s3-uri")
parser.add_argument("--callback-url"); parser.add_argument("--config"); parser.add_argument("--config-file")
parser.add_argument("--log-level", default="INFO")
args = parser.parse_args()
job_id = args.job_id or os.getenv("JOB_ID")
model_name = args.model_name or os.getenv("MODEL_NAME")
dataset_s3_uri = args.dataset_s3_uri or os.getenv("DATASET_S3_URI")
callback_url = args.callback_url or os.getenv("CALLBACK_URL")
config = json.loads(args.config or os.getenv("CONFIG") or "{}")
if not all([job_id, model_name, dataset_s3_uri, callback_url]):
    raise ValueError("Missing required arguments: job_id, model_name, dataset_s3_uri, callback_url")
behaviour = config.get("behaviour", "train")
sdk = TrainerSDK()
epochs = int(config.get("epochs", 1))
try:
    sdk.report_started("training")
    work = Path(tempfile.mkdtemp(prefix=f"training-{job_id}-"))
    dataset_id = dataset_s3_uri.rstrip("/").split("/")[-1]
    if os.getenv("SNAPSHOT_ID") and os.getenv("DATASET_VERSION_HASH"):
        dataset_dir = Path(sdk.download_dataset_with_cache(os.environ["SNAPSHOT_ID"], dataset_id,
                                                           os.environ["DATASET_VERSION_HASH"], str(work)))
    else:
        dataset_dir = Path(sdk.download_dataset(dataset_id, str(work / "dataset")))
    if behaviour == "dataset-error":
        raise FileNotFoundError("annotations_detection.json is missing")
    if behaviour == "die":
        os._exit(3)
    sdk.convert_dataset(str(dataset_dir), "dice", "yolo", config.get("split_config"))
    data_yaml = dataset_dir / "data.yaml"
    train = [line for line in (dataset_dir / "train.txt").read_text().splitlines() if line]
    val = [line for line in (dataset_dir / "val.txt").read_text().splitlines() if line]
    labels = sorted(p.relative_to(dataset_dir).as_posix() for p in dataset_dir.rglob("labels/**/*.txt"))
    sdk.log("prepared", dataset=str(dataset_dir), train=len(train), val=len(val), labels=labels,
            data_yaml=data_yaml.read_text(), advanced=sdk.get_advanced_config(), mosaic=config.get("mosaic"))
    # Ultralytics' style: one call per epoch, then one more after the final validation (epochs + 1).
    for epoch in range(1, epochs + 2):
        sdk.report_progress(epoch, epochs, {"loss": 1.0 / epoch, "metrics/mAP50(B)": 0.5 + 0.1 * epoch,
                                            "lr": None, "note": "text is dropped"})
    weights = work / "weights"
    weights.mkdir()
    (weights / "best.pt").write_bytes(b"best-weights")
    (weights / "last.pt").write_bytes(b"last-weights")
    best = sdk.upload_checkpoint(str(weights / "best.pt"), "best")
    last = sdk.upload_checkpoint(str(weights / "last.pt"), "last")
    sdk.report_completed({"loss": 0.2, "metrics/mAP50-95(B)": 0.4}, checkpoints={"best": best, "last": last},
                         total_epochs=epochs)
    sdk.close()
except Exception as error:
    sdk.report_failed(ErrorType.DATASET_ERROR if isinstance(error, FileNotFoundError) else ErrorType.UNKNOWN_ERROR,
                      str(error), traceback.format_exc(), 0)
    sdk.close()
    sys.exit(1)
'''

CAPABILITIES = {
    "framework": "legacy-yolo",
    "display_name": "Legacy YOLO (original SDK)",
    "description": "A trainer directory written for the original platform",
    "version": "1.0.0",
    "models": [{"model_name": "legacy-n", "display_name": "Legacy Nano", "task_types": ["detection"],
                "description": "tiny", "supported": True, "parameters": {"min": 1.8, "macs": 6.5}}],
    "task_types": [{"name": "detection", "display_name": "Object Detection", "description": "boxes", "supported": True}],
    "dataset_formats": [{"name": "yolo", "display_name": "YOLO", "description": "", "supported": True},
                        {"name": "dice", "display_name": "DICE", "description": "", "supported": True}],
}


def write_trainer_dir(root: Path) -> Path:
    """A trainer directory: `train.py` + `capabilities.json`, nothing else (no trainer_sdk.py)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN_PY)
    (root / "capabilities.json").write_text(json.dumps(CAPABILITIES, indent=2))
    return root
