"""Inference jobs: REST endpoints, use cases, schemas."""
