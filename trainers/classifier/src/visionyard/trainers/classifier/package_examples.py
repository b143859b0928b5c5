"""The runnable examples written into export packages (kept as text: they run outside the platform).

The ONNX example needs only onnxruntime, Pillow and numpy; it reproduces the preprocessing from
`metadata.json`, so what it prints is what the platform's inference would say.
"""

from __future__ import annotations

ONNX_EXAMPLE = '''"""Classify images with this exported model: python example.py IMAGE [IMAGE ...]

Needs onnxruntime, Pillow and numpy (pip install onnxruntime pillow numpy). Prints one line per
image: the file, the predicted class and its probability.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = Path(__file__).resolve().parent


def preprocess(path, prep):
    """The image as the model saw its training images: (1, C, H, W) float32."""
    width, height = prep["resize"][1], prep["resize"][0]
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    data = np.asarray(rgb, dtype=np.float32) * np.float32(prep["scale"])
    if prep["grayscale"]:
        data = (data @ np.asarray(prep["gray_weights"], dtype=np.float32))[..., None]
    data = data.transpose(2, 0, 1)[None]
    mean = np.asarray(prep["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(prep["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((data - mean) / std).astype(np.float32)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    metadata = json.loads((HERE / "metadata.json").read_text())
    session = ort.InferenceSession(str(HERE / metadata["model_file"]), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for arg in argv:
        batch = preprocess(arg, metadata["preprocessing"])
        probabilities = softmax(session.run(None, {input_name: batch})[0])[0]
        index = int(probabilities.argmax())
        print(f"{arg}\\t{metadata['class_names'][index]}\\t{probabilities[index]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

TORCHSCRIPT_EXAMPLE = ONNX_EXAMPLE.replace(
    "Needs onnxruntime, Pillow and numpy (pip install onnxruntime pillow numpy).",
    "Needs torch, Pillow and numpy.",
).replace(
    "import onnxruntime as ort\n", "import torch\n"
).replace(
    '''    session = ort.InferenceSession(str(HERE / metadata["model_file"]), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
''',
    '''    model = torch.jit.load(str(HERE / metadata["model_file"]), map_location="cpu").eval()
''',
).replace(
    "        probabilities = softmax(session.run(None, {input_name: batch})[0])[0]\n",
    "        with torch.no_grad():\n"
    "            probabilities = softmax(model(torch.from_numpy(batch)).numpy())[0]\n",
)
