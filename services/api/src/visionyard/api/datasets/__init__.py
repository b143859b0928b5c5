"""Datasets: endpoints, use cases and wire schemas."""
