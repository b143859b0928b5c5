"""Training jobs: endpoints, use cases and wire schemas."""
