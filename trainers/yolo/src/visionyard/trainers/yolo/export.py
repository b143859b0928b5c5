"""Export entry point the runner spawns: `python -m visionyard.trainers.yolo.export`.

Exports a stored YOLO checkpoint with Ultralytics' exporter (ONNX without onnxslim, or TorchScript),
then validates it for real: the exported model and the PyTorch model run on the same seeded inputs
and the maximum absolute difference is recorded for the box coordinates (normalised by the image size,
and in pixels) and for the class scores (plus mask coefficients/prototypes for segmentation). It passes
when every normalised difference is within the tolerance. `package.zip` holds the model,
`metadata.json` and a runnable `example.py` that decodes boxes with numpy. Exit 2 marks a user error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from visionyard.shared.sdk import ENV_JOB_FILE, ExportJob, Reporter
from visionyard.trainers.yolo import offline
from visionyard.trainers.yolo.package_examples import ONNX_EXAMPLE, TORCHSCRIPT_EXAMPLE

EXIT_USER_ERROR = 2
FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
# float32 box coordinates in pixels differ by ~1e-4 between runtimes; compare them normalised.
MIN_TOLERANCE = 1e-4


class ExportError(Exception):
    """The export cannot be done as asked (the user's request, not a crash)."""


def _first_tensor(output: Any) -> Any:
    while isinstance(output, list | tuple):
        output = output[0]
    return output


def _reference_outputs(model: Any, inputs: Any) -> list[Any]:
    """The PyTorch model's outputs in the exported graph's order (predictions, then mask prototypes)."""
    import torch

    with torch.no_grad():
        raw = model(inputs)
    if isinstance(raw, list | tuple):
        first = raw[0]
        if isinstance(first, list | tuple):  # segment: ((predictions, protos), ...) in eval mode
            return [first[0].numpy(), first[1].numpy()] if len(first) > 1 else [first[0].numpy()]
        protos = raw[1] if len(raw) > 1 and hasattr(raw[1], "shape") and raw[1].dim() == 4 else None
        return [first.numpy()] + ([protos.numpy()] if protos is not None else [])
    return [raw.numpy()]


def compare(expected: list[Any], actual: list[Any], *, imgsz: int, num_classes: int, tolerance: float) -> dict[str, Any]:
    """Max abs differences: boxes (normalised and pixels), scores, and any extra output."""
    import numpy as np

    tolerance = max(tolerance, MIN_TOLERANCE)
    predictions_expected, predictions_actual = np.asarray(expected[0]), np.asarray(actual[0])
    if predictions_expected.shape != predictions_actual.shape:
        raise ExportError(f"exported output shape {predictions_actual.shape} differs from PyTorch's {predictions_expected.shape}")
    difference = np.abs(predictions_actual - predictions_expected)
    if difference.ndim == 2:  # a -cls model: class probabilities only
        scores_only = float(difference.max())
        return {"validation_passed": bool(scores_only <= tolerance), "max_abs_diff": scores_only,
                "max_abs_diff_boxes_px": None, "max_abs_diff_boxes_normalised": None,
                "max_abs_diff_scores": scores_only, "max_abs_diff_mask_outputs": None, "tolerance": tolerance}
    box_px = float(difference[:, :4].max())
    scores = float(difference[:, 4 : 4 + num_classes].max())
    extra = float(difference[:, 4 + num_classes :].max()) if difference.shape[1] > 4 + num_classes else 0.0
    protos = 0.0
    if len(expected) > 1 and len(actual) > 1:
        protos = float(np.abs(np.asarray(actual[1]) - np.asarray(expected[1])).max())
    normalised = max(box_px / imgsz, scores)
    # Mask coefficients and prototypes are unbounded activations: compare them relative to their range.
    scale = max(float(np.abs(predictions_expected[:, 4 + num_classes :]).max()) if extra else 1.0, 1.0)
    extra_relative = max(extra / scale, protos / max(float(np.abs(np.asarray(expected[1])).max()), 1.0)
                         if len(expected) > 1 else 0.0)
    return {
        "validation_passed": bool(max(normalised, extra_relative) <= tolerance),
        "max_abs_diff": max(normalised, extra_relative),
        "max_abs_diff_boxes_px": box_px,
        "max_abs_diff_boxes_normalised": box_px / imgsz,
        "max_abs_diff_scores": scores,
        "max_abs_diff_mask_outputs": max(extra, protos) if (extra or protos) else None,
        "tolerance": tolerance,
    }


def validate(model: Any, model_path: Path, *, export_format: str, imgsz: int, num_classes: int, num_samples: int,
             tolerance: float, dynamic_batch: bool) -> dict[str, Any]:
    """Run the export and PyTorch on seeded inputs (one batch, or one image at a time when the batch is fixed)."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(num_samples, 3, imgsz, imgsz, generator=generator)
    expected = _reference_outputs(model, inputs)
    batches = [inputs] if dynamic_batch else [inputs[i : i + 1] for i in range(num_samples)]
    pieces: list[list[Any]] = []
    if export_format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        pieces = [session.run(None, {input_name: batch.numpy()}) for batch in batches]
    else:
        module = torch.jit.load(str(model_path), map_location="cpu").eval()
        with torch.no_grad():
            for batch in batches:
                out = module(batch)
                pieces.append([t.numpy() for t in out] if isinstance(out, list | tuple) else [out.numpy()])
    actual = [np.concatenate([piece[i] for piece in pieces]) for i in range(len(pieces[0]))]
    checked = compare(expected, actual, imgsz=imgsz, num_classes=num_classes, tolerance=tolerance)
    checked["num_samples"] = num_samples
    return checked


def run_export(job: ExportJob, reporter: Reporter) -> dict[str, Any]:
    """Export, validate and package; returns the result written to `export_result.json`."""
    if job.export_format not in FORMATS:
        raise ExportError(f"export_format {job.export_format!r} is not supported; choose one of {', '.join(FORMATS)}")
    config = job.export_config
    for option in ("fp16", "int8", "embed_preprocessing", "simplify"):
        if config.get(option):
            raise ExportError(f"export_config.{option} is not supported by the YOLO exporter")
    opset = int(config.get("opset_version") or 17)
    dynamic_batch = bool(config.get("dynamic_axes", True))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    offline.configure(job.output_dir / "ultralytics-config")
    from ultralytics import YOLO

    started = time.perf_counter()
    work = job.output_dir / "work"
    work.mkdir(exist_ok=True)
    checkpoint = work / "model.pt"
    shutil.copyfile(job.checkpoint, checkpoint)
    try:
        yolo = YOLO(str(checkpoint))
    except Exception as error:
        raise ExportError(f"cannot load the checkpoint as a YOLO model: {error}") from error
    imgsz = int((yolo.overrides or {}).get("imgsz") or 640)
    names = {int(k): str(v) for k, v in yolo.names.items()}
    reporter.log(f"exporting {job.model_name or 'YOLO'} ({yolo.task}) to {job.export_format} at {imgsz}px",
                 event_type="export")
    if job.export_format == "onnx":
        exported = Path(yolo.export(format="onnx", imgsz=imgsz, dynamic=dynamic_batch, opset=opset, simplify=False,
                                    half=False, device="cpu", verbose=False))
        model_file = "model.onnx"
    else:
        exported = Path(yolo.export(format="torchscript", imgsz=imgsz, half=False, device="cpu", verbose=False))
        model_file = "model.torchscript"
    model_path = job.output_dir / model_file
    shutil.move(str(exported), model_path)
    export_seconds = time.perf_counter() - started

    validation = job.validation_config
    checked: dict[str, Any] = {"validation_passed": None, "max_abs_diff": None}
    if validation.get("validate_outputs", True):
        reporter.log("validating the exported model against PyTorch", event_type="validate")
        reference = YOLO(str(checkpoint)).model.float().eval()
        checked = validate(
            reference, model_path, export_format=job.export_format, imgsz=imgsz, num_classes=len(names),
            num_samples=int(validation.get("num_samples") or 4), tolerance=float(validation.get("tolerance") or 1e-4),
            dynamic_batch=dynamic_batch or job.export_format == "torchscript",
        )
    batch: int | str = "batch" if dynamic_batch else 1
    metadata = {
        "framework": job.framework or "ultralytics",
        "model_name": job.model_name,
        "format": job.export_format,
        "task": yolo.task,
        "task_type": job.task_type,
        "model_file": model_file,
        "opset_version": opset if job.export_format == "onnx" else None,
        "input": {"name": INPUT_NAME, "shape": [batch, 3, imgsz, imgsz], "dtype": "float32"},
        "output": {"layout": "[batch, 4 + num_classes (+ 32 mask coefficients | keypoints), anchors]",
                   "meaning": "rows 0-3: box cx, cy, w, h in input pixels; then one sigmoid score per class"},
        "num_classes": len(names),
        "class_names": [names[i] for i in sorted(names)],
        "preprocessing": {"color": "RGB", "resize": [imgsz, imgsz], "scale": "1/255", "layout": "NCHW"},
        "training_job_id": job.training_job_id,
        "export_id": job.export_id,
        "created_at": datetime.now(UTC).isoformat(),
        "validation": checked,
    }
    example = ONNX_EXAMPLE if job.export_format == "onnx" else TORCHSCRIPT_EXAMPLE
    with zipfile.ZipFile(job.package_path, "w", compression=zipfile.ZIP_DEFLATED) as package:
        package.write(model_path, model_file)
        package.writestr("metadata.json", json.dumps(metadata, indent=2))
        package.writestr("example.py", example)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        **checked,
        "model_file": model_file,
        "model_size_bytes": model_path.stat().st_size,
        "package_size_bytes": job.package_path.stat().st_size,
        "export_seconds": round(export_seconds, 4),
        "input_shape": metadata["input"]["shape"],
        "class_names": metadata["class_names"],
        "opset_version": metadata["opset_version"],
    }
    job.result_path.write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    """Read the job file, export; exit 0, or 2 for a user error."""
    reporter = Reporter.from_env()
    try:
        job = ExportJob.model_validate_json(Path(os.environ[ENV_JOB_FILE]).read_text())
    except (KeyError, OSError, ValueError) as error:
        print(f"error: cannot read the export job file: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    try:
        result = run_export(job, reporter)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        reporter.close()
    print(f"exported: validation_passed={result['validation_passed']} max_abs_diff={result['max_abs_diff']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
