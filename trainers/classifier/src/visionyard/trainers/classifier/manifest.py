"""Capability manifest of the built-in PyTorch image classifier (must not import torch)."""

from __future__ import annotations

from visionyard.shared.manifest import ModelInfo, TrainerManifest

MANIFEST = TrainerManifest(
    name="pytorch-classifier",
    framework="pytorch",
    version="0.1.0",
    module="visionyard.trainers.classifier",
    task_types=["image_classification"],
    models=[
        ModelInfo(
            model_name="simple_cnn",
            display_name="Simple CNN",
            task_types=["image_classification"],
            description="Three conv blocks with batch norm; fast on small images.",
        ),
        ModelInfo(
            model_name="tiny_resnet",
            display_name="Tiny ResNet",
            task_types=["image_classification"],
            description="A small residual network (three basic blocks).",
        ),
    ],
    dataset_formats=["imagefolder"],
    primary_metric={"image_classification": "accuracy"},
    config_schema={
        "type": "object",
        "properties": {
            "image_size": {
                "type": "integer", "default": 32, "minimum": 8, "maximum": 512,
                "title": "Image size", "description": "Images are resized to a square of this side.",
            },
            "optimizer": {"type": "string", "enum": ["adam", "sgd"], "default": "adam", "title": "Optimizer"},
            "weight_decay": {"type": "number", "default": 0.0, "minimum": 0.0, "title": "Weight decay"},
            "val_split": {
                "type": "number", "default": 0.2, "minimum": 0.0, "maximum": 0.9,
                "title": "Validation split", "description": "Used only when the dataset has no val folder.",
            },
            "seed": {"type": "integer", "default": 42, "title": "Random seed"},
            "lr_schedule": {
                "type": "string", "enum": ["cosine", "constant"], "default": "cosine",
                "title": "Learning-rate schedule", "description": "Cosine decays to 0 over the epochs.",
            },
            "augment": {
                "type": "boolean", "default": False, "title": "Augment",
                "description": "Random shifts of a few pixels while training.",
            },
        },
    },
    supports_resume=True,
    export_module="visionyard.trainers.classifier.export",
    predict_module="visionyard.trainers.classifier.predict",
    export_formats=["onnx", "torchscript"],
)
