"""Export jobs: REST endpoints, use cases, schemas."""
