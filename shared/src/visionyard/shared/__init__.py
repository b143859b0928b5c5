"""Visionyard contracts and runtime helpers shared by every service.

Only contracts (commands, events, subjects, streams), the trainer SDK and small runtime helpers
live here; no business logic.
"""
