"""The platform database: ORM models, sessions and repositories."""
