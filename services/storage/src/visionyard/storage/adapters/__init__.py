"""Adapters: the only modules that touch the filesystem layout, boto3 and the NATS object store."""
