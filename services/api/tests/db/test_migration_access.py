"""Migration 0004_access carries existing rows over: projects from project_id strings, integer job ids."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, insert, select

from visionyard.api.auth.service import AuthService
from visionyard.api.db.migrate import alembic_config, upgrade_to_head
from visionyard.api.db.models import Checkpoint, Dataset, TrainingJob, TrainingLog, TrainingMetric, utcnow
from visionyard.api.db.models_access import Project, ProjectMember
from visionyard.api.db.models_exports import ExportJob, InferenceJob, InferenceResult
from visionyard.api.db.session import UnitOfWork, make_engine, make_session_factory

from ..pgschema import fresh_postgres_schema


@contextmanager
def _sqlite(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'legacy.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[Engine]:
    if kind == "sqlite":
        with _sqlite(tmp_path) as engine:
            yield engine
    else:
        with fresh_postgres_schema() as (engine, _):
            yield engine


def _upgrade(engine: Engine, target: str) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, target)


def _job(job_id: str, project: str) -> Any:
    # A Core insert names only these columns (and those with client-side defaults): the model's later columns
    # do not exist in this old schema.
    return insert(TrainingJob.__table__).values(
        id=job_id, project_id=project, experiment_name="e", framework="pytorch", model_name="simple_cnn",
        task_type="image_classification", dataset_id="ds1", dataset_snapshot_id="h1", epochs=2, batch_size=8,
        learning_rate=0.01, primary_metric="accuracy", primary_metric_mode="max", status="completed", attempt=1,
    )


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_existing_rows_get_projects_and_integer_ids(kind: str, tmp_path: Path) -> None:
    with _database(kind, tmp_path) as engine:
        _upgrade(engine, "0002_datasets")
        _upgrade(engine, "0003_exports_inference")
        factory = make_session_factory(engine)
        with factory() as session, session.begin():
            session.add(Dataset(id="ds1", project_id="default", name="d", class_names=[], class_counts={}, splits={},
                                task_types=[]))
            session.execute(_job("a" * 32, "default"))
            session.execute(_job("b" * 32, "team-x"))
            session.flush()
            session.add(TrainingMetric(job_id="a" * 32, attempt=1, seq=1, epoch=1, extra_metrics={}))
            session.add(TrainingLog(job_id="a" * 32, attempt=1, seq=2, level="INFO", event_type="log", message="m"))
            # Core inserts of the columns revision 0003 has: the head models have more (0005's checkpoint_sha256,
            # 0007's checkpoint seq).
            session.execute(insert(Checkpoint.__table__).values(
                job_id="a" * 32, kind="best", attempt=1, status="stored", uri="file:///b.pt", created_at=utcnow(),
                updated_at=utcnow()))
            session.execute(insert(ExportJob.__table__).values(
                id="e" * 32, project_id="default", training_job_id="a" * 32, export_format="onnx",
                checkpoint_kind="best", export_config={}, validation_config={}, version=1, is_default=True,
                status="completed", exporter_done=True, attempt=1, created_at=utcnow()))
            session.add(InferenceJob(id="i" * 32, project_id="team-x", training_job_id="b" * 32,
                                     checkpoint_kind="best", inference_type="batch", input_data={},
                                     task_type="image_classification", status="completed", attempt=1))
            session.flush()
            session.add(InferenceResult(inference_job_id="i" * 32, position=0, image_name="x.png",
                                        top5_predictions=[]))

        upgrade_to_head(engine)

        with factory() as session:
            projects = {row.name: str(row.id) for row in session.scalars(select(Project))}
            assert set(projects) == {"Uncategorized", "team-x"}
            jobs = {row.project_id: row.id for row in session.scalars(select(TrainingJob))}
            assert set(jobs) == {projects["Uncategorized"], projects["team-x"]}
            assert all(job_id.isdigit() for job_id in jobs.values())
            first = jobs[projects["Uncategorized"]]
            assert session.scalars(select(TrainingMetric.job_id)).all() == [first]
            assert session.scalars(select(TrainingLog.job_id)).all() == [first]
            assert session.scalars(select(Checkpoint.job_id)).all() == [first]
            export = session.scalars(select(ExportJob)).one()
            assert export.id.isdigit() and export.training_job_id == first
            inference = session.scalars(select(InferenceJob)).one()
            assert inference.id.isdigit() and inference.training_job_id == jobs[projects["team-x"]]
            assert session.scalars(select(InferenceResult.inference_job_id)).all() == [inference.id]
            assert len({int(first), int(export.id), int(inference.id), int(jobs[projects["team-x"]])}) == 4
            assert session.scalar(select(Dataset.project_id)) == projects["Uncategorized"]

        # The first admin adopts the projects nobody owns.
        auth = AuthService(uow=UnitOfWork(factory), secret="s" * 32, access_minutes=5, refresh_days=1,
                           settings_keys=[], anonymous_as_admin=False)
        auth.bootstrap(email="root@example.com", password="correct horse", embedded=False,
                       login_file=tmp_path / "unused.json")
        with factory() as session:
            owners = {row.owner_id for row in session.scalars(select(Project)) if row.name == "team-x"}
            assert len(owners) == 1 and None not in owners
            roles = {row.role for row in session.scalars(select(ProjectMember))}
            assert roles == {"owner"}
