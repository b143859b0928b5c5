"""Deployments of completed exports: inference endpoints with their own keys, and package links."""
