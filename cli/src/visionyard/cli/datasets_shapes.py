"""Build a synthetic detection dataset: coloured shapes on textured backgrounds, in YOLO or COCO form.

The detection demo, the YOLO trainer's tests and the benchmark share it. Every image has one to three
non-overlapping shapes (circle, square, triangle) of random size, colour and position on a noisy,
striped background; labels are exact (boxes, and polygons for segmentation). Images are split into
`train`/`val` inside the archive and a `test` split is kept out of it (`heldout_dir`) so a trained
model can be checked on images it never saw. The same seed gives byte-identical archives.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle")
# A fixed timestamp makes the zip byte-identical for the same seed, so its content hash is stable.
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: its class, box (pixels, xyxy) and outline polygon (pixels)."""

    class_id: int
    box: tuple[float, float, float, float]
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ShapesSummary:
    """What was built: the archive, the held-out folder and the counts."""

    zip_path: Path
    heldout_dir: Path
    class_names: list[str]
    split_counts: dict[str, int]
    num_objects: int
    sha256: str = ""
    image_size: int = 128
    layout: str = "yolo"
    heldout: list[dict[str, object]] = field(default_factory=list)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise plus soft stripes of a random angle: enough texture that a shape is not just a blob."""
    base = rng.integers(40, 200, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 20)
    stripes = 25.0 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    noise = rng.normal(0, 18, size=(size, size, 3)).astype(np.float32)
    image = base[None, None, :] + stripes[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_polygon(class_id: int, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    if class_id == 0:  # circle, as a 24-gon
        steps = 24
        return [(cx + radius * math.cos(2 * math.pi * i / steps), cy + radius * math.sin(2 * math.pi * i / steps))
                for i in range(steps)]
    corners = 4 if class_id == 1 else 3
    offset = rotation if class_id == 2 else math.pi / 4
    return [(cx + radius * math.cos(offset + 2 * math.pi * i / corners),
             cy + radius * math.sin(offset + 2 * math.pi * i / corners)) for i in range(corners)]


def render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[ShapeObject]]:
    """One image with 1–3 shapes that do not overlap, and their labels."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    objects: list[ShapeObject] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            radius = float(rng.uniform(size * 0.09, size * 0.2))
            cx = float(rng.uniform(radius + 1, size - radius - 1))
            cy = float(rng.uniform(radius + 1, size - radius - 1))
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        class_id = int(rng.integers(0, len(CLASS_NAMES)))
        polygon = _shape_polygon(class_id, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon(polygon, fill=colour, outline=(0, 0, 0))
        xs = [min(max(x, 0.0), size) for x, _ in polygon]
        ys = [min(max(y, 0.0), size) for _, y in polygon]
        objects.append(ShapeObject(class_id=class_id, box=(min(xs), min(ys), max(xs), max(ys)),
                                   polygon=tuple(zip(xs, ys, strict=True))))
        placed.append((cx, cy, radius))
    return image, objects


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _yolo_line(obj: ShapeObject, size: int, *, segment: bool) -> str:
    if segment:
        coords = " ".join(f"{x / size:.6f} {y / size:.6f}" for x, y in obj.polygon)
        return f"{obj.class_id} {coords}"
    x1, y1, x2, y2 = obj.box
    return f"{obj.class_id} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"


def _write(bundle: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    bundle.writestr(info, data)


def build_shapes_dataset(
    out_dir: Path,
    *,
    num_images: int = 300,
    image_size: int = 128,
    heldout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    seed: int = 0,
    layout: str = "yolo",
    segment: bool = False,
) -> ShapesSummary:
    """Write `shapes-<layout>.zip` (train/val) and `heldout/` (test images + `labels.json`) under `out_dir`.

    `layout` is `yolo` (data.yaml, images/<split>/, labels/<split>/) or `coco` (instances_<split>.json
    beside images/<split>/); `segment` adds polygons (YOLO polygon lines, COCO `segmentation`).
    """
    if layout not in ("yolo", "coco"):
        raise ValueError(f"layout must be yolo or coco, got {layout!r}")
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout_dir = out_dir / "heldout"
    heldout_dir.mkdir(exist_ok=True)
    n_test = int(round(num_images * heldout_fraction))
    n_val = int(round((num_images - n_test) * val_fraction))
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (num_images - n_test - n_val)
    zip_path = out_dir / f"shapes-{layout}.zip"
    counts = {"train": 0, "val": 0, "test": 0}
    coco: dict[str, dict[str, list[dict[str, object]]]] = {}
    heldout: list[dict[str, object]] = []
    total_objects = 0
    with zipfile.ZipFile(zip_path, "w") as bundle:
        for index, split in enumerate(splits):
            image, objects = render_image(rng, image_size)
            total_objects += len(objects)
            name = f"shape_{index:04d}.png"
            counts[split] += 1
            if split == "test":
                image.save(heldout_dir / name)
                heldout.append({"file": name, "objects": [
                    {"class_id": o.class_id, "class_name": CLASS_NAMES[o.class_id], "box": [round(v, 2) for v in o.box]}
                    for o in objects]})
                continue
            _write(bundle, f"images/{split}/{name}", _png(image))
            if layout == "yolo":
                text = "".join(_yolo_line(o, image_size, segment=segment) + "\n" for o in objects)
                _write(bundle, f"labels/{split}/{Path(name).stem}.txt", text.encode())
            else:
                document = coco.setdefault(split, {"images": [], "annotations": []})
                image_id = len(document["images"]) + 1
                document["images"].append({"id": image_id, "file_name": f"images/{split}/{name}",
                                           "width": image_size, "height": image_size})
                for obj in objects:
                    x1, y1, x2, y2 = obj.box
                    annotation: dict[str, object] = {
                        "id": len(document["annotations"]) + 1, "image_id": image_id,
                        "category_id": obj.class_id + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    }
                    if segment:
                        annotation["segmentation"] = [[round(v, 2) for point in obj.polygon for v in point]]
                    document["annotations"].append(annotation)
        if layout == "yolo":
            names = "".join(f"  - {name}\n" for name in CLASS_NAMES)
            _write(bundle, "data.yaml", f"nc: {len(CLASS_NAMES)}\nnames:\n{names}".encode())
        else:
            categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)]
            for split, document in sorted(coco.items()):
                _write(bundle, f"instances_{split}.json",
                       json.dumps({**document, "categories": categories}).encode())
    (heldout_dir / "labels.json").write_text(json.dumps({"class_names": list(CLASS_NAMES), "images": heldout}))
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    return ShapesSummary(zip_path=zip_path, heldout_dir=heldout_dir, class_names=list(CLASS_NAMES),
                         split_counts=counts, num_objects=total_objects, sha256=digest, image_size=image_size,
                         layout=layout, heldout=heldout)
