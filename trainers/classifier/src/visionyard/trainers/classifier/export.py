"""Export entry point the runner spawns: `python -m visionyard.trainers.classifier.export`.

Reads the export job file, loads the checkpoint, writes ONNX (legacy TorchScript-based exporter:
torch 2.13's default dynamo exporter needs onnxscript, which is not installed) or TorchScript,
validates it for real (onnxruntime / the TorchScript module against the PyTorch model on seeded
random inputs, max abs difference vs tolerance), and zips the model, `metadata.json` and a runnable
`example.py` into `package.zip`. Exit 2 marks a user error (bad checkpoint, unsupported format).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionyard.shared.sdk import ENV_JOB_FILE, ExportJob, Reporter
from visionyard.trainers.classifier.inference_model import CheckpointError, InferenceModel, load_inference_model
from visionyard.trainers.classifier.package_examples import ONNX_EXAMPLE, TORCHSCRIPT_EXAMPLE

EXIT_USER_ERROR = 2
FORMATS = ("onnx", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(Exception):
    """The export cannot be done as asked (the user's request, not a crash)."""


def export_onnx(loaded: InferenceModel, path: Path, *, opset: int, dynamic_batch: bool) -> None:
    """Write the model as ONNX with a dynamic batch axis (unless disabled)."""
    sample = torch.zeros(1, loaded.in_channels, loaded.image_size, loaded.image_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is expected here
        torch.onnx.export(
            loaded.model, (sample,), str(path), opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False,
        )


def export_torchscript(loaded: InferenceModel, path: Path) -> None:
    """Write the model as a traced TorchScript module."""
    sample = torch.zeros(1, loaded.in_channels, loaded.image_size, loaded.image_size)
    with torch.no_grad():
        traced = torch.jit.trace(loaded.model, sample)
    traced.save(str(path))


def validate(
    loaded: InferenceModel, model_path: Path, *, export_format: str, num_samples: int, tolerance: float,
    dynamic_batch: bool,
) -> dict[str, Any]:
    """Run the exported model and PyTorch on the same seeded inputs; the max abs difference vs tolerance."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(num_samples, loaded.in_channels, loaded.image_size, loaded.image_size, generator=generator)
    with torch.no_grad():
        expected = loaded.model(inputs).numpy()
    if export_format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        if dynamic_batch:
            actual = session.run(None, {INPUT_NAME: inputs.numpy()})[0]
        else:
            actual = np.concatenate([session.run(None, {INPUT_NAME: inputs[i : i + 1].numpy()})[0]
                                     for i in range(num_samples)])
    else:
        module = torch.jit.load(str(model_path), map_location="cpu").eval()
        with torch.no_grad():
            actual = module(inputs).numpy()
    max_diff = float(np.max(np.abs(actual - expected)))
    same_top1 = float(np.mean(actual.argmax(axis=1) == expected.argmax(axis=1)))
    return {
        "validation_passed": bool(max_diff <= tolerance),
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "num_samples": num_samples,
        "top1_agreement": same_top1,
    }


def metadata_of(loaded: InferenceModel, job: ExportJob, *, model_file: str, opset: int | None,
                dynamic_batch: bool) -> dict[str, Any]:
    """The package's metadata.json: what the model is and how to feed it."""
    batch: int | str = "batch" if dynamic_batch else 1
    return {
        "framework": job.framework or "pytorch",
        "model_name": loaded.model_name,
        "format": job.export_format,
        "task_type": job.task_type or "image_classification",
        "model_file": model_file,
        "opset_version": opset,
        "input": {"name": INPUT_NAME, "shape": [batch, loaded.in_channels, loaded.image_size, loaded.image_size],
                  "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [batch, loaded.num_classes], "dtype": "float32",
                   "meaning": "logits; apply softmax for probabilities"},
        "num_classes": loaded.num_classes,
        "class_names": loaded.class_names,
        "preprocessing": loaded.preprocessing(),
        "training_job_id": job.training_job_id,
        "export_id": job.export_id,
        "checkpoint_epoch": loaded.epoch,
        "created_at": datetime.now(UTC).isoformat(),
    }


def run_export(job: ExportJob, reporter: Reporter) -> dict[str, Any]:
    """Export, validate and package; returns the result written to `export_result.json`."""
    if job.export_format not in FORMATS:
        raise ExportError(f"export_format {job.export_format!r} is not supported; choose one of {', '.join(FORMATS)}")
    config = job.export_config
    for option in ("simplify", "fp16", "int8", "embed_preprocessing"):
        if config.get(option):
            raise ExportError(f"export_config.{option} is not supported by the classifier exporter")
    opset = int(config.get("opset_version") or 17)
    dynamic_batch = bool(config.get("dynamic_axes", True))
    validation = job.validation_config
    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded = load_inference_model(job.checkpoint)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    model_file = "model.onnx" if job.export_format == "onnx" else "model.pt"
    model_path = job.output_dir / model_file
    reporter.log(f"exporting {loaded.model_name} to {job.export_format}", event_type="export")
    if job.export_format == "onnx":
        export_onnx(loaded, model_path, opset=opset, dynamic_batch=dynamic_batch)
    else:
        export_torchscript(loaded, model_path)
    export_seconds = time.perf_counter() - started
    checked: dict[str, Any] = {"validation_passed": None, "max_abs_diff": None}
    if validation.get("validate_outputs", True):
        reporter.log("validating the exported model against PyTorch", event_type="validate")
        checked = validate(
            loaded, model_path, export_format=job.export_format,
            num_samples=int(validation.get("num_samples") or 8),
            tolerance=float(validation.get("tolerance") or 1e-4), dynamic_batch=dynamic_batch,
        )
    metadata = metadata_of(loaded, job, model_file=model_file,
                           opset=opset if job.export_format == "onnx" else None, dynamic_batch=dynamic_batch)
    metadata["validation"] = checked
    reporter.log("packaging", event_type="package")
    example = ONNX_EXAMPLE if job.export_format == "onnx" else TORCHSCRIPT_EXAMPLE
    with zipfile.ZipFile(job.package_path, "w", compression=zipfile.ZIP_DEFLATED) as package:
        package.write(model_path, model_file)
        package.writestr("metadata.json", json.dumps(metadata, indent=2))
        package.writestr("example.py", example)
    result = {
        **checked,
        "model_file": model_file,
        "model_size_bytes": model_path.stat().st_size,
        "package_size_bytes": job.package_path.stat().st_size,
        "export_seconds": round(export_seconds, 4),
        "input_shape": metadata["input"]["shape"],
        "output_shape": metadata["output"]["shape"],
        "class_names": loaded.class_names,
        "opset_version": metadata["opset_version"],
    }
    job.result_path.write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    """Read the job file, export; exit 0, or 2 for a user error."""
    import os

    reporter = Reporter.from_env()
    try:
        job = ExportJob.model_validate_json(Path(os.environ[ENV_JOB_FILE]).read_text())
    except (KeyError, OSError, ValueError) as error:
        print(f"error: cannot read the export job file: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    try:
        result = run_export(job, reporter)
    except (ExportError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        reporter.close()
    print(f"exported: validation_passed={result['validation_passed']} max_abs_diff={result['max_abs_diff']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
