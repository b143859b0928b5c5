"""Visionyard tracker: mirrors job events into MLflow (the only MLflow writer) and answers
metric-history and summary requests for the API."""
