"""Adapters of the tracker's ports: MLflow (the run store) and JetStream (event history)."""
