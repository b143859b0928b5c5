"""Adapters: the only modules talking to NATS-backed ports on behalf of use cases."""
