"""Capability manifest of the built-in YOLO trainer (must not import torch or Ultralytics).

The services' environment imports this module to advertise the trainer; the trainer itself runs in
the `ultralytics` trainer environment (`make trainer-env`), where Ultralytics (AGPL-3.0) is installed.
"""

from __future__ import annotations

from visionyard.shared.manifest import ModelInfo, TrainerManifest

FRAMEWORK = "ultralytics"
ENVIRONMENT = "ultralytics"
SIZES = {"n": "nano", "s": "small", "m": "medium", "l": "large", "x": "extra large"}
FAMILIES = {"yolo11": "YOLO11", "yolov8": "YOLOv8"}
# Model-name suffix → (platform task type, Ultralytics task, what the head predicts).
TASKS = {
    "": ("object_detection", "detect", "boxes"),
    "-seg": ("instance_segmentation", "segment", "boxes and instance masks"),
    "-pose": ("pose_estimation", "pose", "boxes and keypoints"),
    "-cls": ("image_classification", "classify", "one label per image"),
}
PARAMETERS_M = {  # millions, Ultralytics' published figures for the detection models
    "yolo11n": 2.6, "yolo11s": 9.4, "yolo11m": 20.1, "yolo11l": 25.3, "yolo11x": 56.9,
    "yolov8n": 3.2, "yolov8s": 11.2, "yolov8m": 25.9, "yolov8l": 43.7, "yolov8x": 68.2,
}


TASK_INFO = {
    "object_detection": ("Object Detection", "Locate objects with boxes and class labels"),
    "instance_segmentation": ("Instance Segmentation", "Boxes plus a mask outline per object"),
    "pose_estimation": ("Pose Estimation", "Boxes plus keypoints per object (datasets with keypoints)"),
    "image_classification": ("Image Classification", "Classify images with Ultralytics' -cls models"),
}
FORMAT_INFO = {
    "yolo": ("YOLO", "data.yaml with images/ and labels/ (boxes, polygons or keypoints)"),
    "coco": ("COCO", "instances JSON files; converted to YOLO when the job starts"),
    "dice": ("DICE", "the original platform's annotations_<task>.json; converted to YOLO when the job starts"),
    "imagefolder": ("ImageFolder", "one folder per class, for the -cls models"),
}


def _models() -> list[ModelInfo]:
    models: list[ModelInfo] = []
    for family, family_name in FAMILIES.items():
        for suffix, (task_type, _, predicts) in TASKS.items():
            for size, size_name in SIZES.items():
                name = f"{family}{size}{suffix}"
                models.append(ModelInfo(
                    model_name=name,
                    display_name=f"{family_name}{size}{suffix}",
                    task_types=[task_type],
                    description=f"{family_name} {size_name}, built from {name}.yaml; predicts {predicts}. "
                                "Pretrained weights only from the runner's local weights directory.",
                    supported=True,
                    parameters={"min": PARAMETERS_M[f"{family}{size}"]},
                    export_formats=["onnx", "torchscript"],
                    pretrained=False,
                    tags=["yolo", family, task_type] + (["cpu"] if size == "n" else []),
                ))
    return models


def ultralytics_task(model_name: str) -> str:
    """The Ultralytics task a model name trains (`yolo11n-seg` → `segment`)."""
    for suffix in ("-seg", "-pose", "-cls"):
        if model_name.endswith(suffix):
            return TASKS[suffix][1]
    return "detect"


CONFIG_SCHEMA = {
    "type": "object",
    "properties": {
        "imgsz": {"type": "integer", "default": 640, "minimum": 32, "maximum": 2048, "title": "Image size",
                  "description": "Training and validation image side (a multiple of 32 is used)."},
        "optimizer": {"type": "string", "enum": ["auto", "SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp"],
                      "default": "auto", "title": "Optimizer",
                      "description": "auto lets Ultralytics choose the optimizer and learning rate; any other "
                                     "uses the job's learning_rate (or lr0)."},
        "lr0": {"type": "number", "minimum": 0, "maximum": 1, "title": "Initial learning rate",
                "description": "Overrides the job's learning_rate when an optimizer is chosen."},
        "lrf": {"type": "number", "default": 0.01, "minimum": 0, "maximum": 1, "title": "Final LR fraction"},
        "momentum": {"type": "number", "default": 0.937, "minimum": 0, "maximum": 1, "title": "Momentum"},
        "weight_decay": {"type": "number", "default": 0.0005, "minimum": 0, "maximum": 1, "title": "Weight decay"},
        "warmup_epochs": {"type": "number", "default": 3.0, "minimum": 0, "title": "Warm-up epochs"},
        "cos_lr": {"type": "boolean", "default": False, "title": "Cosine LR schedule"},
        "mosaic": {"type": "number", "default": 1.0, "minimum": 0, "maximum": 1, "title": "Mosaic probability"},
        "close_mosaic": {"type": "integer", "default": 10, "minimum": 0, "title": "Epochs without mosaic at the end"},
        "mixup": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1, "title": "Mixup probability"},
        "fliplr": {"type": "number", "default": 0.5, "minimum": 0, "maximum": 1, "title": "Horizontal flip probability"},
        "flipud": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1, "title": "Vertical flip probability"},
        "degrees": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 180, "title": "Rotation (degrees)"},
        "translate": {"type": "number", "default": 0.1, "minimum": 0, "maximum": 1, "title": "Translation fraction"},
        "scale": {"type": "number", "default": 0.5, "minimum": 0, "maximum": 1, "title": "Scale gain"},
        "hsv_h": {"type": "number", "default": 0.015, "minimum": 0, "maximum": 1, "title": "Hue augmentation"},
        "hsv_s": {"type": "number", "default": 0.7, "minimum": 0, "maximum": 1, "title": "Saturation augmentation"},
        "hsv_v": {"type": "number", "default": 0.4, "minimum": 0, "maximum": 1, "title": "Value augmentation"},
        "patience": {"type": "integer", "default": 100, "minimum": 0, "title": "Early-stopping patience (epochs)"},
        "pretrained": {"type": "boolean", "title": "Start from local pretrained weights",
                       "description": "Reads <model>.pt from the runner's weights directory "
                                      "(VISIONYARD_RUNNER_WEIGHTS_DIR); unset: use them when present."},
        "val_split": {"type": "number", "default": 0.2, "minimum": 0.05, "maximum": 0.9, "title": "Validation split",
                      "description": "Used only when neither the job nor the dataset defines a validation split."},
        "seed": {"type": "integer", "default": 0, "title": "Random seed"},
        "workers": {"type": "integer", "default": 0, "minimum": 0, "maximum": 16, "title": "Data-loader workers"},
        "conf": {"type": "number", "default": 0.25, "minimum": 0, "maximum": 1,
                 "title": "Prediction confidence threshold"},
        "iou": {"type": "number", "default": 0.7, "minimum": 0, "maximum": 1, "title": "NMS IoU threshold"},
    },
}

MANIFEST = TrainerManifest(
    name="ultralytics-yolo",
    framework=FRAMEWORK,
    display_name="Ultralytics YOLO",
    description="YOLO11 and YOLOv8 detection, segmentation, pose and classification on Ultralytics "
                "(AGPL-3.0, installed only in the ultralytics trainer environment).",
    version="0.1.0",
    module="visionyard.trainers.yolo",
    environment=ENVIRONMENT,
    task_types=[{"name": name, "display_name": title, "description": text, "supported": True}
                for name, (title, text) in TASK_INFO.items()],
    models=_models(),
    dataset_formats=[{"name": name, "display_name": title, "description": text, "supported": True}
                     for name, (title, text) in FORMAT_INFO.items()],
    primary_metric={
        "object_detection": "mAP50-95",
        "instance_segmentation": "mask_mAP50-95",
        "pose_estimation": "pose_mAP50-95",
        "image_classification": "accuracy",
    },
    config_schema=CONFIG_SCHEMA,
    supports_resume=True,
    export_module="visionyard.trainers.yolo.export",
    predict_module="visionyard.trainers.yolo.predict",
    export_formats=["onnx", "torchscript"],
)
