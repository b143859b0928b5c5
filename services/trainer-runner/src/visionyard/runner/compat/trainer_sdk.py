"""Visionyard's `trainer_sdk`: the original platform's trainer SDK API (v2.0.0), spoken over the runner's pipe.

The runner puts this directory first on `PYTHONPATH` when it starts a trainer directory written for the
original platform, so `from trainer_sdk import TrainerSDK, ErrorType` finds this module and the trainer
runs unchanged. Every call that used to be an HTTP callback or an S3 transfer becomes a JSON line on the
pipe the runner passed (`VISIONYARD_EVENTS_FD`), the same records Visionyard's own SDK writes:

* `report_progress` → `progress` (metric names made acceptable to MLflow; epochs past the total allowed),
* `log`/`log_event`/`report_validation`/`report_started` → `log`,
* `upload_checkpoint`/`upload_file` → the file is copied into the job's outbox and declared (`checkpoint`),
* `report_completed` → `result`; `report_failed` → `failure` (the runner classifies the job by it),
* dataset "downloads" return the version the runner already staged, as a DICE directory
  (`annotations_<task>.json` + images), which `convert_dataset(..., 'dice', 'yolo')` turns into YOLO.

No HTTP, no storage credentials, no network. Standard library only (PyYAML and Pillow are used when the
trainer's environment has them), so it runs in any trainer environment.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Dict, List, Literal, Optional, Tuple

__version__ = "2.0.0"

ENV_EVENTS_FD = "VISIONYARD_EVENTS_FD"
ENV_JOB_FILE = "VISIONYARD_JOB_FILE"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TASK_ANNOTATION_FILES = {
    "detection": "annotations_detection.json",
    "object_detection": "annotations_detection.json",
    "classification": "annotations_classification.json",
    "image_classification": "annotations_classification.json",
    "segmentation": "annotations_segmentation.json",
    "instance_segmentation": "annotations_segmentation.json",
    "pose": "annotations_pose.json",
    "pose_estimation": "annotations_pose.json",
}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
_UNSAFE_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
_UNSAFE_KIND_CHARS = re.compile(r"[^A-Za-z0-9_-]")

logger = logging.getLogger(__name__)


class ErrorType:
    """Error types `report_failed` takes; the runner maps each to a failure reason."""

    DATASET_ERROR = "DatasetError"
    CHECKPOINT_ERROR = "CheckpointError"
    CONFIG_ERROR = "ConfigError"
    RESOURCE_ERROR = "ResourceError"
    NETWORK_ERROR = "NetworkError"
    FRAMEWORK_ERROR = "FrameworkError"
    VALIDATION_ERROR = "ValidationError"
    UNKNOWN_ERROR = "UnknownError"


class StorageClient:
    """Kept for imports only: a Visionyard trainer holds no storage credentials and reaches no bucket."""

    def __init__(self, endpoint: str = "", access_key: str = "", secret_key: str = "", bucket: str = "") -> None:
        self.endpoint = endpoint
        self.bucket = bucket

    def _refuse(self, *_: Any, **__: Any) -> str:
        raise RuntimeError("Visionyard trainers have no storage access: use TrainerSDK's dataset and upload methods")

    download_file = upload_file = download_directory = _refuse


# -- the pipe -------------------------------------------------------------------------------------------


class _Pipe:
    """One JSON object per line to the runner (stderr when run by hand); thread-safe."""

    def __init__(self) -> None:
        fd = os.environ.get(ENV_EVENTS_FD)
        self._sink: IO[str] = sys.stderr if fd is None else os.fdopen(int(fd), "w", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def emit(self, record: Dict[str, Any]) -> None:
        record["ts"] = time.time()
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._sink.write(line + "\n")
            self._sink.flush()

    def flush(self) -> None:
        # Never closed here: the original's trainers report a failure after `close()`; the runner sees
        # end-of-file when the process exits.
        with self._lock:
            self._sink.flush()


def _metric_name(name: str) -> str:
    """`metrics/mAP50(B)` → `metrics/mAP50_B`: MLflow refuses parentheses (the original left runs RUNNING)."""
    return _UNSAFE_METRIC_CHARS.sub("_", str(name)).strip("_") or "metric"


def _clean_metrics(metrics: Optional[Dict[str, Any]]) -> Dict[str, float]:
    clean: Dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if value is None or isinstance(value, (dict, list, tuple, str)):
            continue
        try:
            clean[_metric_name(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return clean


def _read_job() -> Dict[str, Any]:
    path = os.environ.get(ENV_JOB_FILE)
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        job: Dict[str, Any] = json.load(handle)
    return job


# -- images and YAML without hard dependencies ---------------------------------------------------------


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) of an image: Pillow when installed, else the PNG/GIF/BMP/JPEG header."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except ImportError:
        pass
    with open(path, "rb") as handle:
        head = handle.read(26)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack(">II", head[16:24])
            return int(width), int(height)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", head[6:10])
            return int(width), int(height)
        if head.startswith(b"BM"):
            width, height = struct.unpack("<ii", head[18:26])
            return int(width), abs(int(height))
        if head.startswith(b"\xff\xd8"):
            handle.seek(2)
            while True:
                marker = handle.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    break
                if marker[1] in (0xD8, 0x01) or 0xD0 <= marker[1] <= 0xD7:
                    continue
                (length,) = struct.unpack(">H", handle.read(2))
                if 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
                    _, height, width = struct.unpack(">BHH", handle.read(5))
                    return int(width), int(height)
                handle.seek(length - 2, os.SEEK_CUR)
    raise ValueError(f"{path}: cannot read the image size (install Pillow for this image type)")


def _load_yaml(path: Path) -> Dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        import yaml

        loaded = yaml.safe_load(text)
        return loaded if isinstance(loaded, dict) else {}
    except ImportError:
        pass
    try:
        loaded = json.loads(text)
        return loaded if isinstance(loaded, dict) else {}
    except ValueError:
        pass
    # The common `names:` spellings without PyYAML: a flow list, a block list or an index map.
    result: Dict[str, Any] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("names:"):
            continue
        rest = line[len("names:"):].strip()
        if rest.startswith("["):
            result["names"] = [item.strip().strip("'\"") for item in rest.strip("[]").split(",") if item.strip()]
        else:
            block: Any = []
            for item in lines[index + 1:]:
                stripped = item.strip()
                if not item.startswith((" ", "\t", "-")) or not stripped:
                    break
                if stripped.startswith("- "):
                    block.append(stripped[2:].strip().strip("'\""))
                elif ":" in stripped:
                    block = block if isinstance(block, dict) else {}
                    key, _, value = stripped.partition(":")
                    block[int(key.strip())] = value.strip().strip("'\"")
            result["names"] = block
    return result


def _dump_yaml(path: Path, data: Dict[str, Any]) -> None:
    try:
        import yaml

        path.write_text(yaml.safe_dump(data, default_flow_style=False, allow_unicode=True), encoding="utf-8")
    except ImportError:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")  # JSON is YAML


def _split_of(relative: str) -> Optional[str]:
    for part in Path(relative).parts[:-1]:
        split = SPLIT_NAMES.get(part.lower())
        if split is not None:
            return split
    return None


def _dataset_root(staged: Path) -> Path:
    """The staged version's root: a zip that wrapped everything in one folder is looked into."""
    entries = [entry for entry in staged.iterdir() if not entry.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return staged


# -- the SDK --------------------------------------------------------------------------------------------


class TrainerSDK:
    """The original `TrainerSDK`, reporting to the Visionyard runner that started this process."""

    DEFAULT_DATASET_CACHE_DIR = "/tmp/datasets"
    DEFAULT_CACHE_MAX_SIZE_GB = 50

    def __init__(self) -> None:
        self.job_id = os.getenv("JOB_ID")
        if not self.job_id:
            raise ValueError("JOB_ID environment variable is required")
        self.callback_url = os.getenv("CALLBACK_URL", "")
        self._operation_type = "training"
        self._job = _read_job()
        self._pipe = _Pipe()
        self._total_epochs: Optional[int] = None
        self._last_epoch = 0
        self._closed = False
        self.SHARED_DATASET_CACHE = Path(os.getenv("DATASET_CACHE_DIR", self.DEFAULT_DATASET_CACHE_DIR))
        self.CACHE_MAX_SIZE_GB = int(os.getenv("DATASET_CACHE_MAX_GB", str(self.DEFAULT_CACHE_MAX_SIZE_GB)))
        self.external_storage = StorageClient(bucket=os.getenv("EXTERNAL_BUCKET_DATASETS", "training-datasets"))
        self.internal_storage = StorageClient(bucket=os.getenv("INTERNAL_BUCKET_CHECKPOINTS", "training-checkpoints"))
        logger.info("TrainerSDK (Visionyard pipe) initialized for job %s", self.job_id)

    # -- job context ---------------------------------------------------------------------------------

    @property
    def task_type(self) -> str:
        """The job's task type."""
        return os.getenv("TASK_TYPE", "detection")

    @property
    def model_name(self) -> str:
        """The job's model name."""
        return os.getenv("MODEL_NAME", "")

    @property
    def dataset_id(self) -> str:
        """The job's dataset id."""
        return os.getenv("DATASET_ID", "")

    @property
    def snapshot_id(self) -> str:
        """The pinned dataset version."""
        return os.getenv("SNAPSHOT_ID", "")

    @property
    def dataset_version_hash(self) -> str:
        """The pinned dataset version's content hash."""
        return os.getenv("DATASET_VERSION_HASH", "")

    @property
    def framework(self) -> str:
        """The trainer's framework."""
        return os.getenv("FRAMEWORK", "")

    # -- configuration -------------------------------------------------------------------------------

    def _config_json(self) -> Dict[str, Any]:
        try:
            loaded = json.loads(os.getenv("CONFIG", "{}") or "{}")
        except ValueError as error:
            logger.warning("CONFIG is not JSON: %s", error)
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def get_basic_config(self) -> Dict[str, Any]:
        """Basic settings: an env variable wins over CONFIG, which wins over the legacy variable and the default."""
        config = self._config_json()

        def pick(env: str, key: str, legacy: str, default: Any, kind: Any) -> Any:
            if os.getenv(env):
                value: Any = os.getenv(env)
            elif key in config:
                value = config[key]
            elif os.getenv(legacy):
                value = os.getenv(legacy)
            else:
                value = default
            if kind is bool:
                return value.lower() == "true" if isinstance(value, str) else bool(value)
            return kind(value)

        return {
            "imgsz": pick("IMGSZ", "imgsz", "CONFIG_IMGSZ", "640", int),
            "epochs": pick("EPOCHS", "epochs", "CONFIG_EPOCHS", "100", int),
            "batch": pick("BATCH_SIZE", "batch", "CONFIG_BATCH", "16", int),
            "lr0": pick("LEARNING_RATE", "learning_rate", "CONFIG_LR0", "0.01", float),
            "optimizer": pick("OPTIMIZER", "optimizer", "CONFIG_OPTIMIZER", "auto", str),
            "augment": pick("AUGMENT", "augment", "CONFIG_AUGMENT", "True", bool),
            "device": pick("DEVICE", "device", "CONFIG_DEVICE", "0", str),
            "workers": pick("WORKERS", "workers", "CONFIG_WORKERS", "8", int),
            "patience": pick("PATIENCE", "patience", "CONFIG_PATIENCE", "50", int),
        }

    def get_advanced_config(self) -> Dict[str, Any]:
        """The job's advanced options (CONFIG's `advanced_config`, else ADVANCED_CONFIG)."""
        config = self._config_json()
        if isinstance(config.get("advanced_config"), dict):
            return dict(config["advanced_config"])
        try:
            loaded = json.loads(os.getenv("ADVANCED_CONFIG", "{}") or "{}")
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def get_full_config(self) -> Dict[str, Any]:
        """Basic and advanced settings together."""
        return {"basic": self.get_basic_config(), "advanced": self.get_advanced_config()}

    # -- lifecycle -------------------------------------------------------------------------------------

    @staticmethod
    def _get_timestamp() -> str:
        return datetime.now(timezone.utc).isoformat()

    def report_started(self, operation_type: str = "training", total_epochs: Optional[int] = None) -> None:
        """The job started (the runner already announced it; this is a log line)."""
        self._operation_type = operation_type
        if operation_type == "training":
            self._total_epochs = int(total_epochs if total_epochs is not None else self.get_basic_config()["epochs"])
        self._pipe.emit({"type": "log", "level": "INFO", "event_type": "trainer",
                         "message": f"{operation_type} started", "data": {"total_epochs": self._total_epochs}})

    def report_progress(self, epoch: int, total_epochs: int, metrics: Dict[str, float],
                        extra_data: Optional[Dict[str, Any]] = None) -> None:
        """One epoch's metrics; an epoch past `total_epochs` is accepted (Ultralytics sends one)."""
        self._last_epoch = max(self._last_epoch, int(epoch))
        total = int(total_epochs) if total_epochs else int(self._total_epochs or epoch or 1)
        self._pipe.emit({"type": "progress", "epoch": int(epoch), "total_epochs": max(total, 1),
                         "metrics": _clean_metrics(metrics)})

    def report_validation(self, epoch: int, task_type: str, primary_metric: Tuple[str, float],
                          all_metrics: Dict[str, float], class_names: Optional[List[str]] = None,
                          visualization_urls: Optional[Dict[str, str]] = None,
                          per_class_metrics: Optional[Dict[str, Dict[str, float]]] = None,
                          is_best: bool = False) -> None:
        """Validation results, kept with the job's logs."""
        name, value = primary_metric
        data = {"epoch": epoch, "task_type": task_type, "primary_metric_name": name, "primary_metric_value": value,
                "metrics": all_metrics, "is_best": is_best, "class_names": class_names,
                "visualization_urls": visualization_urls, "per_class_metrics": per_class_metrics}
        self._pipe.emit({"type": "log", "level": "INFO", "event_type": "validation",
                         "message": f"validation epoch {epoch}: {name}={value}", "data": data})

    def report_completed(self, final_metrics: Dict[str, float], checkpoints: Optional[Dict[str, str]] = None,
                         total_epochs: Optional[int] = None, extra_data: Optional[Dict[str, Any]] = None) -> None:
        """The outcome; the runner completes the job when the process then exits 0."""
        epochs = int(total_epochs) if total_epochs else self._last_epoch
        self._pipe.emit({"type": "result", "final_metrics": _clean_metrics(final_metrics), "best_metrics": {},
                         "best_epoch": None, "epochs_completed": epochs})

    def report_failed(self, error_type: str, message: str, traceback: Optional[str] = None,
                      epochs_completed: int = 0) -> None:
        """The job failed; the runner fails it with a reason derived from `error_type`."""
        self._pipe.emit({"type": "failure", "error_type": str(error_type), "message": str(message),
                         "traceback": traceback, "epochs_completed": int(epochs_completed or 0)})

    def report_inference_completed(self, total_images: int, total_time_ms: float, results: List[Dict[str, Any]],
                                   result_urls: Optional[Dict[str, str]] = None) -> None:
        """Inference results, kept with the job's logs."""
        self._pipe.emit({"type": "log", "level": "INFO", "event_type": "inference",
                         "message": f"inference completed: {total_images} images in {total_time_ms:.1f} ms",
                         "data": {"total_images": total_images, "total_inference_time_ms": total_time_ms,
                                  "results": results, "result_urls": result_urls}})

    def report_export_completed(self, export_format: str, output_s3_uri: str, file_size_bytes: int,
                                metadata: Dict[str, Any]) -> None:
        """Export results, kept with the job's logs."""
        self._pipe.emit({"type": "log", "level": "INFO", "event_type": "export",
                         "message": f"export completed: {export_format} ({file_size_bytes} bytes)",
                         "data": {"export_format": export_format, "output_uri": output_s3_uri,
                                  "file_size_bytes": file_size_bytes, "metadata": metadata}})

    @staticmethod
    def create_export_metadata(framework: str, model_name: str, export_format: str, task_type: str,
                               input_shape: List[int], output_shape: List[List[int]],
                               class_names: Optional[List[str]] = None,
                               preprocessing: Optional[Dict[str, Any]] = None,
                               postprocessing: Optional[Dict[str, Any]] = None,
                               export_config: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
        """The export metadata dictionary in the original's shape."""
        metadata: Dict[str, Any] = {
            "framework": framework, "model_name": model_name, "export_format": export_format,
            "task_type": task_type, "input_shape": input_shape, "input_dtype": "float32",
            "output_shape": output_shape, "created_at": datetime.now(timezone.utc).isoformat(),
        }
        if class_names:
            metadata["class_names"] = class_names
            metadata["num_classes"] = len(class_names)
        for key, value in (("preprocessing", preprocessing), ("postprocessing", postprocessing),
                           ("export_config", export_config)):
            if value:
                metadata[key] = value
        metadata.update(extra)
        return metadata

    # -- files out: through the job's outbox ------------------------------------------------------------

    def _declare(self, local_path: str, kind: str) -> None:
        source = Path(local_path)
        if not source.is_file():
            raise FileNotFoundError(f"{local_path}: no such file to upload")
        outbox = Path(self._job.get("outbox_dir") or Path.cwd() / "outbox")
        outbox.mkdir(parents=True, exist_ok=True)
        # A copy, so the trainer may overwrite its file at once while the runner stages this one.
        target = outbox / f"{uuid.uuid4().hex}-{kind}{source.suffix}"
        shutil.copyfile(source, target)
        self._pipe.emit({"type": "checkpoint", "kind": kind, "path": str(target), "epoch": self._last_epoch or None})

    def upload_checkpoint(self, local_path: str, checkpoint_type: str, metrics: Optional[Dict[str, float]] = None) -> str:
        """Declare a checkpoint; storage keeps it at `checkpoints/<job_id>/<type>.pt` in the internal bucket."""
        kind = _UNSAFE_KIND_CHARS.sub("_", str(checkpoint_type)).strip("_-") or "checkpoint"
        self._declare(local_path, kind)
        uri = f"s3://{self.internal_storage.bucket}/checkpoints/{self.job_id}/{kind}.pt"
        if metrics:
            self.log_event("checkpoint", f"Saved {kind} checkpoint", data={"s3_uri": uri, "metrics": metrics})
        return uri

    def upload_file(self, local_path: str, s3_key: str, content_type: str = "application/octet-stream",
                    storage_type: str = "internal") -> str:
        """Keep a file with the job's artifacts (as `file-<name>`), like a checkpoint."""
        stem = Path(s3_key).name.rsplit(".", 1)[0]
        kind = ("file-" + _UNSAFE_KIND_CHARS.sub("_", stem))[:100].strip("_-")
        self._declare(local_path, kind)
        return f"s3://{self.internal_storage.bucket}/checkpoints/{self.job_id}/{kind}.pt"

    def download_checkpoint(self, s3_uri: str, local_path: str) -> str:
        """The checkpoint the runner staged for this attempt (a resumed job's last one), copied to `local_path`."""
        staged = self._job.get("resume_checkpoint")
        if not staged or not Path(staged).is_file():
            raise FileNotFoundError(f"{s3_uri}: no checkpoint was staged for this attempt (only a resumed job has one)")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged, local_path)
        return local_path

    # -- datasets in: the version the runner staged -------------------------------------------------------

    def _staged_root(self) -> Path:
        staged = self._job.get("dataset_dir")
        if not staged or not Path(staged).is_dir():
            raise FileNotFoundError("the runner staged no dataset for this job")
        return _dataset_root(Path(staged))

    def download_dataset(self, dataset_id: str, dest_dir: str) -> str:
        """The job's pinned dataset version at `dest_dir`, in DICE form (images linked, annotations JSON)."""
        return str(self._materialize_dice(Path(dest_dir)))

    def download_dataset_selective(self, dataset_id: str, dest_dir: str) -> str:
        """Same as `download_dataset`: only the staged version's own files are there."""
        return self.download_dataset(dataset_id, dest_dir)

    def download_dataset_with_cache(self, snapshot_id: str, dataset_id: str, dataset_version_hash: str,
                                    dest_dir: str) -> str:
        """The pinned version (the runner caches it by content hash) at `<dest_dir>/dataset`, in DICE form."""
        return str(self._materialize_dice(Path(dest_dir) / "dataset"))

    def download_dataset_from_annotation(self, annotation_data: Dict[str, Any], dest_dir: str,
                                         annotation_format: str = "labelme") -> str:
        """Not served: a Visionyard job trains on its pinned dataset version, not on arbitrary bucket keys."""
        raise NotImplementedError("download_dataset_from_annotation: Visionyard stages the job's pinned dataset "
                                  "version; use download_dataset")

    def _materialize_dice(self, dest: Path) -> Path:
        root = self._staged_root()
        dest.mkdir(parents=True, exist_ok=True)
        for source in sorted(root.rglob("*")):
            if not source.is_file() or source.suffix.lower() not in IMAGE_SUFFIXES | {".json"}:
                continue
            target = dest / source.relative_to(root)
            if target.exists() or target.is_symlink():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, target)  # the staged version is shared by jobs: linked, never written
        task_file = TASK_ANNOTATION_FILES.get(self.task_type, f"annotations_{self.task_type}.json")
        if (dest / task_file).is_file() or (dest / "annotations.json").is_file():
            return dest
        dice = self._dice_from_coco(root) or self._dice_from_yolo(root)
        if dice is not None:
            (dest / task_file).write_text(json.dumps(dice), encoding="utf-8")
        return dest

    def _dice_from_coco(self, root: Path) -> Optional[Dict[str, Any]]:
        files = []
        for path in sorted(root.rglob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data:
                files.append((path, data))
        if not files:
            return None
        images: List[Dict[str, Any]] = []
        annotations: List[Dict[str, Any]] = []
        categories: Dict[int, Dict[str, Any]] = {}
        for path, data in files:
            split = SPLIT_NAMES.get(next((p for p in re.split(r"[_\-.]", path.stem.lower()) if p in SPLIT_NAMES), ""))
            id_map: Dict[Any, int] = {}
            for image in data["images"]:
                relative = self._image_relative(root, path.parent, str(image["file_name"]))
                new_id = len(images) + 1
                id_map[image["id"]] = new_id
                images.append({**image, "id": new_id, "file_name": relative,
                               "split": image.get("split") or split or _split_of(relative)})
            for annotation in data.get("annotations", []):
                if annotation.get("image_id") in id_map:
                    annotations.append({**annotation, "id": len(annotations) + 1,
                                        "image_id": id_map[annotation["image_id"]]})
            for category in data.get("categories", []):
                categories.setdefault(category["id"], category)
        return {"images": images, "annotations": annotations,
                "categories": [categories[key] for key in sorted(categories)]}

    @staticmethod
    def _image_relative(root: Path, json_dir: Path, file_name: str) -> str:
        for base in (root, root / "images", json_dir, json_dir / "images", json_dir.parent / "images"):
            candidate = base / file_name
            if candidate.is_file():
                return candidate.relative_to(root).as_posix()
        return file_name

    def _dice_from_yolo(self, root: Path) -> Optional[Dict[str, Any]]:
        data_yaml = next((root / name for name in ("data.yaml", "data.yml", "dataset.yaml") if (root / name).is_file()),
                         None)
        if data_yaml is None:
            return None
        layout = _load_yaml(data_yaml)
        raw = layout.get("names") or []
        has_keypoints = bool(layout.get("kpt_shape"))
        names = [raw[key] for key in sorted(raw)] if isinstance(raw, dict) else list(raw)
        categories = [{"id": index + 1, "name": str(name)} for index, name in enumerate(names)]
        images: List[Dict[str, Any]] = []
        annotations: List[Dict[str, Any]] = []
        for image_path in sorted(root.rglob("*")):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES or not image_path.is_file():
                continue
            relative = image_path.relative_to(root).as_posix()
            parts = list(Path(relative).parts)
            if "images" in parts:
                parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
            label = (root / Path(*parts)).with_suffix(".txt")
            width, height = _image_size(image_path)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": relative, "width": width, "height": height,
                           "split": _split_of(relative)})
            if not label.is_file():
                continue
            for line in label.read_text(encoding="utf-8").splitlines():
                values = line.split()
                if len(values) < 5:
                    continue
                cls, numbers = int(float(values[0])), [float(v) for v in values[1:]]
                annotation: Dict[str, Any] = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1}
                if len(numbers) == 4 or has_keypoints:
                    cx, cy, w, h = numbers[:4]
                    annotation["bbox"] = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
                else:  # a polygon: its bounding box, and the polygon as COCO segmentation
                    xs, ys = numbers[0::2], numbers[1::2]
                    annotation["bbox"] = [min(xs) * width, min(ys) * height, (max(xs) - min(xs)) * width,
                                          (max(ys) - min(ys)) * height]
                    annotation["segmentation"] = [[v * (width if i % 2 == 0 else height) for i, v in enumerate(numbers)]]
                annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
                annotations.append(annotation)
        return {"images": images, "annotations": annotations, "categories": categories}

    # -- conversion -------------------------------------------------------------------------------------

    def convert_dataset(self, dataset_dir: str, source_format: str, target_format: str,
                        split_config: Optional[Dict[str, Any]] = None, task_type: Optional[str] = None) -> str:
        """DICE → YOLO (labels, train/val lists, data.yaml), DICE → COCO (already is); others are refused."""
        task = task_type or self.task_type
        if source_format == "dice" and target_format == "yolo":
            return self._dice_to_yolo(Path(dataset_dir), split_config, task)
        if source_format == "dice" and target_format == "coco":
            return str(dataset_dir)
        if source_format == target_format:
            return str(dataset_dir)
        raise NotImplementedError(f"Conversion {source_format} -> {target_format} not implemented")

    def _annotation_file(self, root: Path, task: str) -> Optional[Path]:
        for name in (TASK_ANNOTATION_FILES.get(task, f"annotations_{task}.json"), "annotations.json"):
            if (root / name).is_file():
                return root / name
        return None

    def _dice_to_yolo(self, root: Path, split_config: Optional[Dict[str, Any]], task: str) -> str:
        annotation_file = self._annotation_file(root, task)
        if annotation_file is None:
            logger.info("no DICE annotations in %s; nothing to convert", root)
            return str(root)
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
        images = list(data.get("images", []))
        if images and "annotations" in images[0]:  # the nested variant: images[].annotations + classes
            categories = list(data.get("classes", []))
            annotations = [{"image_id": image["id"], **ann, "category_id": ann.get("category_id", ann.get("class_id"))}
                           for image in images for ann in image.get("annotations", [])]
        else:
            categories = list(data.get("categories", []))
            annotations = list(data.get("annotations", []))
        real = [c for c in categories if c.get("name") != "__background__"]
        index_of = {c["id"]: i for i, c in enumerate(real)}
        names = [str(c["name"]) for c in real]
        by_image: Dict[Any, List[Dict[str, Any]]] = {}
        for ann in annotations:
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        image_root = self._local_image_root(data)
        kpt_shape: Optional[List[int]] = None
        paths: Dict[Any, Path] = {}
        for image in images:
            path = self._find_image(root, str(image["file_name"]), image_root)
            paths[image["id"]] = path
            width = float(image.get("width") or 0) or float(_image_size(path)[0])
            height = float(image.get("height") or 0) or float(_image_size(path)[1])
            lines = []
            for ann in by_image.get(image["id"], []):
                if ann.get("category_id") not in index_of or "bbox" not in ann:
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                cls = index_of[ann["category_id"]]
                polygon = ann.get("segmentation")
                keypoints = ann.get("keypoints")
                if task in ("segmentation", "instance_segmentation") and isinstance(polygon, list) and polygon \
                        and isinstance(polygon[0], list):
                    coords = [v / (width if i % 2 == 0 else height) for i, v in enumerate(polygon[0])]
                    lines.append(" ".join([str(cls)] + [f"{min(max(v, 0.0), 1.0):.6f}" for v in coords]))
                elif task in ("pose", "pose_estimation") and isinstance(keypoints, list) and keypoints:
                    kpt_shape = [len(keypoints) // 3, 3]
                    kpts = [keypoints[i] / (width if i % 3 == 0 else height) if i % 3 != 2 else keypoints[i]
                            for i in range(len(keypoints))]
                    box = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                    lines.append(" ".join([str(cls)] + [f"{v:.6f}" for v in box + kpts]))
                else:
                    box = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                    lines.append(" ".join([str(cls)] + [f"{min(max(v, 0.0), 1.0):.6f}" for v in box]))
            label = self._label_path(root, path)
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines), encoding="utf-8")
        splits = self._assign_splits(root, images, paths, split_config)
        lists: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
        for image in images:
            lists[splits.get(image["id"], "train")].append(str(paths[image["id"]]))
        if not lists["val"]:  # Ultralytics needs a validation list; an all-train split validates on train
            lists["val"] = list(lists["train"])
        for split, entries in lists.items():
            if entries or split != "test":
                (root / f"{split}.txt").write_text("\n".join(entries), encoding="utf-8")
        self.create_data_yaml(str(root), names, train_path="train.txt", val_path="val.txt",
                              test_path="test.txt" if lists["test"] else None)
        if kpt_shape is not None:
            data_yaml = root / "data.yaml"
            config = _load_yaml(data_yaml)
            config["kpt_shape"] = kpt_shape
            _dump_yaml(data_yaml, config)
        self.clean_dataset_cache(str(root))
        self.log_info(f"DICE to YOLO: {len(images)} images, {len(names)} classes, "
                      f"{len(lists['train'])} train / {len(lists['val'])} val")
        return str(root)

    @staticmethod
    def _local_image_root(data: Dict[str, Any]) -> str:
        image_root = str((data.get("storage_info") or {}).get("image_root") or "")
        parts = image_root.split("/")
        return "/".join(parts[2:]) if len(parts) >= 3 and parts[0] == "datasets" else ""

    @staticmethod
    def _find_image(root: Path, file_name: str, image_root: str) -> Path:
        candidates = [root / file_name, root / "images" / file_name]
        if image_root:
            candidates.insert(0, root / image_root / file_name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate.absolute()
        raise FileNotFoundError(f"Image file not found: {file_name} (tried {', '.join(map(str, candidates))})")

    @staticmethod
    def _label_path(root: Path, image: Path) -> Path:
        """Where Ultralytics looks for the label: the last `images` folder of the path becomes `labels`."""
        parts = list(image.relative_to(root.absolute()).parts)
        if "images" in parts[:-1]:
            parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
            return (root / Path(*parts)).with_suffix(".txt")
        return (root / "labels" / Path(*parts)).with_suffix(".txt")

    def _assign_splits(self, root: Path, images: List[Dict[str, Any]], paths: Dict[Any, Path],
                       split_config: Optional[Dict[str, Any]]) -> Dict[Any, str]:
        """The split_config's splits, else the job's pinned split, else the layout's, else a seeded 80/20 cut."""
        if split_config and isinstance(split_config.get("splits"), dict):
            given = {str(key): SPLIT_NAMES.get(str(value).lower(), "train") for key, value in split_config["splits"].items()}
            return {image["id"]: given.get(str(image["id"]), "train") for image in images}
        pinned = self._job.get("split")
        if isinstance(pinned, dict) and pinned:
            by_path: Dict[str, str] = {}
            for split, relatives in pinned.items():
                for relative in relatives or []:
                    by_path[Path(relative).as_posix()] = SPLIT_NAMES.get(split, "train")
            result = {}
            for image in images:
                relative = paths[image["id"]].relative_to(root.absolute()).as_posix()
                # The pinned paths are relative to the staged version; a wrapping folder may prefix them.
                split = next((s for p, s in by_path.items() if p == relative or p.endswith("/" + relative)), None)
                result[image["id"]] = split or "train"
            return result
        if any(image.get("split") for image in images):
            return {image["id"]: SPLIT_NAMES.get(str(image.get("split") or "train"), "train") for image in images}
        config = split_config or {}
        return self.split_dataset(images, train_ratio=float(config.get("train_ratio", 0.8)),
                                  val_ratio=float(config.get("val_ratio", 0.2)), seed=int(config.get("seed", 42)))

    def create_data_yaml(self, dataset_dir: str, class_names: List[str], train_path: str = "train.txt",
                         val_path: str = "val.txt", test_path: Optional[str] = None) -> str:
        """Write a YOLO `data.yaml` naming the lists and the classes."""
        path = Path(dataset_dir) / "data.yaml"
        config: Dict[str, Any] = {"path": str(Path(dataset_dir).absolute()), "train": train_path, "val": val_path,
                                  "nc": len(class_names), "names": list(class_names)}
        if test_path:
            config["test"] = test_path
        _dump_yaml(path, config)
        return str(path)

    def split_dataset(self, images: List[Dict[str, Any]], train_ratio: float = 0.8, val_ratio: float = 0.2,
                      test_ratio: float = 0.0, seed: int = 42, stratify_by: Optional[str] = None) -> Dict[Any, str]:
        """A seeded shuffle cut into train/val/test by the ratios."""
        total = (train_ratio + val_ratio + test_ratio) or 1.0
        shuffled = list(images)
        random.Random(seed).shuffle(shuffled)
        train_end = int(len(shuffled) * train_ratio / total)
        val_end = train_end + int(len(shuffled) * val_ratio / total)
        return {image["id"]: "train" if i < train_end else "val" if i < val_end else "test"
                for i, image in enumerate(shuffled)}

    def validate_dataset(self, dataset_dir: str, expected_format: str, min_images: int = 1,
                         check_labels: bool = True) -> Dict[str, Any]:
        """Counts and problems of a YOLO directory, in the original's result shape."""
        root = Path(dataset_dir)
        issues: List[str] = []
        stats: Dict[str, Any] = {"total_images": 0, "total_labels": 0, "classes": [], "class_distribution": {}}
        if expected_format == "yolo":
            if (root / "data.yaml").is_file():
                stats["classes"] = list(_load_yaml(root / "data.yaml").get("names") or [])
            else:
                issues.append("Missing data.yaml")
            stats["total_images"] = sum(1 for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
                if (root / "images").is_dir() else 0
            if check_labels and (root / "labels").is_dir():
                labels = list((root / "labels").rglob("*.txt"))
                stats["total_labels"] = len(labels)
                for label in labels:
                    for line in label.read_text(encoding="utf-8").splitlines():
                        if line.split():
                            index = int(float(line.split()[0]))
                            name = stats["classes"][index] if index < len(stats["classes"]) else str(index)
                            stats["class_distribution"][name] = stats["class_distribution"].get(name, 0) + 1
        if stats["total_images"] < min_images:
            issues.append(f"Only {stats['total_images']} images found (minimum: {min_images})")
        if check_labels and stats["total_labels"] < stats["total_images"]:
            issues.append(f"Missing labels for {stats['total_images'] - stats['total_labels']} images")
        return {"valid": not issues, "issues": issues, "stats": stats}

    def clean_dataset_cache(self, dataset_dir: str) -> int:
        """Delete Ultralytics' `*.cache` files under the directory (never inside the shared staged version)."""
        deleted = 0
        for cache in Path(dataset_dir).rglob("*.cache"):
            if cache.is_symlink():
                continue
            try:
                cache.unlink()
                deleted += 1
            except OSError:
                pass
        return deleted

    # -- logs ----------------------------------------------------------------------------------------------

    def log(self, message: str, level: str = "INFO", source: str = "trainer", **metadata: Any) -> None:
        """A log line for the job's logs (sent at once: the pipe needs no batching)."""
        self._pipe.emit({"type": "log", "level": str(level).upper(), "event_type": source, "message": str(message),
                         "data": metadata or None})

    def log_info(self, message: str, **metadata: Any) -> None:
        """An INFO line."""
        self.log(message, level="INFO", **metadata)

    def log_warning(self, message: str, **metadata: Any) -> None:
        """A WARNING line."""
        self.log(message, level="WARNING", **metadata)

    def log_error(self, message: str, **metadata: Any) -> None:
        """An ERROR line."""
        self.log(message, level="ERROR", **metadata)

    def log_debug(self, message: str, **metadata: Any) -> None:
        """A DEBUG line."""
        self.log(message, level="DEBUG", **metadata)

    def flush_logs(self) -> None:
        """Nothing is buffered."""

    def log_event(self, event_type: str, message: str, data: Optional[Dict[str, Any]] = None,
                  level: str = "INFO") -> None:
        """A structured event for the job's logs."""
        self._pipe.emit({"type": "log", "level": str(level).upper(), "event_type": str(event_type),
                         "message": str(message), "data": data if isinstance(data, dict) else None})

    # -- cleanup -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush what was reported (calls after `close` still reach the runner)."""
        self._closed = True
        self._pipe.flush()

    def __enter__(self) -> TrainerSDK:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        self.close()
        return False


_INSTANCE: Optional[TrainerSDK] = None


def get_sdk() -> TrainerSDK:
    """One TrainerSDK per process."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = TrainerSDK()
    return _INSTANCE
