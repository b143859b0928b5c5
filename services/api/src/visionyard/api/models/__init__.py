"""Trainer models and their configuration schemas, read from capability manifests."""
