"""Visionyard storage: the only holder of S3 credentials; keeps checkpoints and dataset versions."""
