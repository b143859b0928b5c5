"""Visionyard trainer runner: pulls `cmd.train`, runs trainers as subprocesses, publishes job events."""
