"""Capability manifest of the built-in PyTorch image classifier (must not import torch).

It has the original platform's `capabilities.json` shape; `module`, `export_module`, `predict_module`
and `supports_resume` are the runner's fields beside it.
"""

from __future__ import annotations

from visionyard.shared.manifest import ModelInfo, TrainerManifest

MANIFEST = TrainerManifest(
    name="pytorch-classifier",
    framework="pytorch",
    display_name="PyTorch image classifier",
    description="Small convolutional classifiers trained from scratch on ImageFolder datasets (CPU friendly).",
    version="0.1.0",
    module="visionyard.trainers.classifier",
    task_types=[{
        "name": "image_classification", "display_name": "Image Classification",
        "description": "Classify images into predefined categories", "supported": True,
    }],
    models=[
        ModelInfo(
            model_name="simple_cnn",
            display_name="Simple CNN",
            task_types=["image_classification"],
            description="Three conv blocks with batch norm; fast on small images.",
            supported=True,
            tags=["cnn", "small", "cpu"],
            export_formats=["onnx", "torchscript"],
            pretrained=False,
        ),
        ModelInfo(
            model_name="tiny_resnet",
            display_name="Tiny ResNet",
            task_types=["image_classification"],
            description="A small residual network (three basic blocks).",
            supported=True,
            tags=["resnet", "small", "cpu"],
            export_formats=["onnx", "torchscript"],
            pretrained=False,
        ),
    ],
    dataset_formats=[{
        "name": "imagefolder", "display_name": "ImageFolder",
        "description": "One folder per class (optionally under train/ and val/)", "supported": True,
    }],
    primary_metric={"image_classification": "accuracy"},
    config_schema={
        "fields": [
            {"name": "image_size", "type": "int", "default": 32, "min": 8, "max": 512, "step": 8, "primary": True,
             "group": "basic", "label": "Image size", "description": "Images are resized to a square of this side."},
            {"name": "optimizer", "type": "select", "default": "adam", "options": ["adam", "sgd"],
             "group": "optimizer", "label": "Optimizer", "description": "Optimizer algorithm"},
            {"name": "weight_decay", "type": "float", "default": 0.0, "min": 0.0, "max": 0.1, "step": 0.0001,
             "group": "optimizer", "label": "Weight decay", "description": "L2 regularization", "advanced": True},
            {"name": "lr_schedule", "type": "select", "default": "cosine", "options": ["cosine", "constant"],
             "group": "scheduler", "label": "Learning-rate schedule", "description": "Cosine decays to 0 over the epochs."},
            {"name": "augment", "type": "bool", "default": False, "group": "augmentation", "label": "Augment",
             "description": "Random shifts of a few pixels while training."},
            {"name": "val_split", "type": "float", "default": 0.2, "min": 0.0, "max": 0.9, "step": 0.05,
             "group": "validation", "label": "Validation split",
             "description": "Used only when the dataset has no val folder and no configured split."},
            {"name": "seed", "type": "int", "default": 42, "min": 0, "group": "general", "label": "Random seed",
             "description": "Seed of the split, the initialisation and the shuffling.", "advanced": True},
        ],
        "presets": {
            "easy": {"optimizer": "adam", "lr_schedule": "cosine", "augment": False},
            "medium": {"optimizer": "adam", "lr_schedule": "cosine", "augment": True, "weight_decay": 0.0001},
            "advanced": {"optimizer": "sgd", "lr_schedule": "cosine", "augment": True, "weight_decay": 0.0005},
        },
    },
    supports_resume=True,
    export_module="visionyard.trainers.classifier.export",
    predict_module="visionyard.trainers.classifier.predict",
    export_formats=["onnx", "torchscript"],
)

# Standard backbones (timm) trained by the same loop; they need timm and torchvision, so they run in the
# ultralytics trainer environment (`make trainer-env`) and are advertised only where it exists.
_BACKBONE_INFO = (
    ("resnet18", "ResNet-18", 11.7, "Residual network, 18 layers"),
    ("resnet50", "ResNet-50", 25.6, "Residual network with bottleneck blocks, 50 layers"),
    ("mobilenet_v3", "MobileNetV3-Large", 5.5, "Mobile inverted bottlenecks with squeeze-excitation (timm mobilenetv3_large_100)"),
    ("efficientnet_b0", "EfficientNet-B0", 5.3, "Compound-scaled MBConv network"),
    ("convnext_tiny", "ConvNeXt-T", 28.6, "A ConvNet modernised after vision transformers"),
)

BACKBONES_MANIFEST = TrainerManifest(
    name="timm-classifier",
    framework="timm",
    display_name="Image classification backbones (timm)",
    description="Standard backbones trained from scratch or from local pretrained weights on ImageFolder datasets.",
    version="0.1.0",
    module="visionyard.trainers.classifier",
    environment="ultralytics",
    task_types=[{
        "name": "image_classification", "display_name": "Image Classification",
        "description": "Classify images into predefined categories", "supported": True,
    }],
    models=[
        ModelInfo(
            model_name=name, display_name=display, task_types=["image_classification"],
            description=f"{text}; from scratch, or from <weights dir>/{name}.pth when present (never downloaded).",
            supported=True, parameters={"min": params}, tags=["backbone", "timm"],
            export_formats=["onnx", "torchscript"], pretrained=False,
        )
        for name, display, params, text in _BACKBONE_INFO
    ],
    dataset_formats=[{
        "name": "imagefolder", "display_name": "ImageFolder",
        "description": "One folder per class (optionally under train/ and val/)", "supported": True,
    }],
    primary_metric={"image_classification": "accuracy"},
    config_schema={
        "fields": [
            {"name": "image_size", "type": "int", "default": 64, "min": 8, "max": 512, "step": 8, "primary": True,
             "group": "basic", "label": "Image size", "description": "Images are resized to a square of this side."},
            {"name": "pretrained", "type": "bool", "default": None, "group": "basic", "label": "Local pretrained weights",
             "description": "true: require <weights dir>/<model>.pth; false: from scratch; unset: use them when present."},
            {"name": "optimizer", "type": "select", "default": "adam", "options": ["adam", "sgd"],
             "group": "optimizer", "label": "Optimizer", "description": "Optimizer algorithm"},
            {"name": "weight_decay", "type": "float", "default": 0.0, "min": 0.0, "max": 0.1, "step": 0.0001,
             "group": "optimizer", "label": "Weight decay", "description": "L2 regularization", "advanced": True},
            {"name": "lr_schedule", "type": "select", "default": "cosine", "options": ["cosine", "constant"],
             "group": "scheduler", "label": "Learning-rate schedule", "description": "Cosine decays to 0 over the epochs."},
            {"name": "augment", "type": "bool", "default": False, "group": "augmentation", "label": "Random shifts",
             "description": "Random shifts of up to 1/8 of the side while training."},
            {"name": "hflip", "type": "bool", "default": False, "group": "augmentation", "label": "Horizontal flips",
             "description": "Flip half of each batch left-right while training."},
            {"name": "val_split", "type": "float", "default": 0.2, "min": 0.0, "max": 0.9, "step": 0.05,
             "group": "validation", "label": "Validation split",
             "description": "Used only when the dataset has no val folder and no configured split."},
            {"name": "seed", "type": "int", "default": 42, "min": 0, "group": "general", "label": "Random seed",
             "description": "Seed of the split, the initialisation and the shuffling.", "advanced": True},
        ],
    },
    supports_resume=True,
    export_module="visionyard.trainers.classifier.export",
    predict_module="visionyard.trainers.classifier.predict",
    export_formats=["onnx", "torchscript"],
)
