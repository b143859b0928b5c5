"""Entry point the runner spawns: `python -m visionyard.trainers.classifier`."""

from __future__ import annotations

import sys

from visionyard.trainers.classifier.train import main

if __name__ == "__main__":
    sys.exit(main())
