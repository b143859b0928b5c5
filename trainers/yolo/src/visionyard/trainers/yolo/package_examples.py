"""The `example.py` shipped in each export package: load the model, detect boxes in one image, print them."""

from __future__ import annotations

_DECODE = '''
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
META = json.loads((HERE / "metadata.json").read_text())
SIZE = META["input"]["shape"][-1]
NAMES = META["class_names"]


def preprocess(path):
    """RGB, resized to the model's square input, scaled to [0, 1], NCHW."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    array = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1)[None], width, height


def nms(boxes, scores, iou=0.7):
    """Greedy non-maximum suppression over xyxy boxes; returns kept indices."""
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        order = order[1:][inter / (area(boxes[i]) + area(boxes[order[1:]]) - inter + 1e-9) <= iou]
    return keep


def decode(output, width, height, conf=0.25):
    """[1, 4 + classes (+ extra), anchors] -> [(label, confidence, x1, y1, x2, y2)] in image pixels."""
    predictions = output[0]
    scores_all = predictions[4 : 4 + len(NAMES)]
    classes = scores_all.argmax(0)
    scores = scores_all.max(0)
    mask = scores >= conf
    cx, cy, w, h = predictions[:4, mask]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    boxes *= np.array([width / SIZE, height / SIZE, width / SIZE, height / SIZE])
    found = []
    for i in nms(boxes, scores[mask]):
        found.append((NAMES[classes[mask][i]], float(scores[mask][i]), *[round(float(v), 1) for v in boxes[i]]))
    return found
'''

ONNX_EXAMPLE = '''"""Detect objects in images with the exported ONNX model: python example.py image.png [...]"""
import onnxruntime as ort
''' + _DECODE + '''

session = ort.InferenceSession(str(HERE / META["model_file"]), providers=["CPUExecutionProvider"])
for name in sys.argv[1:]:
    batch, width, height = preprocess(name)
    output = session.run(None, {session.get_inputs()[0].name: batch})[0]
    for label, confidence, x1, y1, x2, y2 in decode(output, width, height):
        print(f"{name}: {label} {confidence:.3f} [{x1}, {y1}, {x2}, {y2}]")
'''

TORCHSCRIPT_EXAMPLE = '''"""Detect objects in images with the exported TorchScript model: python example.py image.png [...]"""
import torch
''' + _DECODE + '''

module = torch.jit.load(str(HERE / META["model_file"]), map_location="cpu").eval()
for name in sys.argv[1:]:
    batch, width, height = preprocess(name)
    with torch.no_grad():
        output = module(torch.from_numpy(batch))
    output = output[0] if isinstance(output, (list, tuple)) else output
    for label, confidence, x1, y1, x2, y2 in decode(output.numpy(), width, height):
        print(f"{name}: {label} {confidence:.3f} [{x1}, {y1}, {x2}, {y2}]")
'''
