"""Bring the database schema to the newest migration (programmatic `alembic upgrade head`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def alembic_config() -> Config:
    """The Alembic configuration shipped in the package."""
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "migrations"))
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration on `engine` in one transaction."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        # "heads": domains add migrations on their own branches from the initial schema.
        command.upgrade(config, "heads")
