"""Adapters: the only modules that touch subprocesses, NATS KV, the object store and the filesystem layout."""
