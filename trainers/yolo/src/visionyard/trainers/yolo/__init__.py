"""Visionyard built-in YOLO trainer on Ultralytics (AGPL-3.0; only in its own environment)."""
