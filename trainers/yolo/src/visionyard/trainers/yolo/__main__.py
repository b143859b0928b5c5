"""Entry point the runner spawns: `python -m visionyard.trainers.yolo` (in the ultralytics environment)."""

from __future__ import annotations

import sys

from visionyard.trainers.yolo.train import main

if __name__ == "__main__":
    sys.exit(main())
