"""Placeholder; replaced by the trainer implementation."""
MANIFEST: dict = {}
