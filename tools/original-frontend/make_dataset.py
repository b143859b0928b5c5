"""Build the harness's dataset with Visionyard's own code (cli/src/visionyard/cli/datasets_digits.py).

Writes, under OUT (default tools/original-frontend/.work/data):
  digits.zip            ImageFolder zip (train/<d>/, val/<d>/) as the project builds it (8x8 PNGs),
                        or upscaled by --scale (nearest) when given
  digits/               the same tree unpacked, for the frontend's folder upload (webkitdirectory)
  heldout/              the held-out test split (8x8) + labels.csv
  heldout-flat/         the held-out images as built (8x8), named label<d>-digit-NNNN.png (inference inputs)
  heldout-big/          the same upscaled to 64x64 (nearest; legible in screenshots, but not the training look)
Run with the platform's interpreter: .venv/bin/python tools/original-frontend/make_dataset.py [--scale N] [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import shutil
import zipfile
from pathlib import Path

from PIL import Image
from visionyard.cli.datasets_digits import build_digits_imagefolder


def _scaled(data: bytes, side: int) -> bytes:
    """One PNG resized to side x side with nearest-neighbour (keeps the digit's pixels crisp)."""
    image = Image.open(io.BytesIO(data))
    image = image.resize((side, side), Image.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    """Build the zip, the unpacked folder and the held-out inference inputs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / ".work" / "data"))
    parser.add_argument("--scale", type=int, default=1, help="upscale factor for the training zip (1 = as built)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = build_digits_imagefolder(out / "digits-8px.zip", out / "heldout", seed=0)
    zip_path = out / "digits.zip"
    with zipfile.ZipFile(out / "digits-8px.zip") as source, zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as dest:
        for info in source.infolist():
            data = source.read(info)
            if args.scale > 1 and info.filename.endswith(".png"):
                data = _scaled(data, 8 * args.scale)
            dest.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data)
    (out / "digits-8px.zip").unlink()
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(out / "digits")
    big, flat = out / "heldout-big", out / "heldout-flat"
    big.mkdir()
    flat.mkdir()
    for png in sorted((out / "heldout").rglob("*.png")):
        # label in the name so a person reading the inference panel can check the prediction
        (flat / f"label{png.parent.name}-{png.name}").write_bytes(png.read_bytes())
        (big / f"label{png.parent.name}-{png.name}").write_bytes(_scaled(png.read_bytes(), 64))
    print(f"zip: {zip_path} ({zip_path.stat().st_size} bytes), splits {summary.split_counts}, "
          f"folder: {out / 'digits'}, held-out 64px: {big} ({len(list(big.iterdir()))} images)")


if __name__ == "__main__":
    main()
