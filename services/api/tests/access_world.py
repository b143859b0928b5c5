"""A served API with real users and one project full of objects, for the access table and the frontend contract.

The app is served by uvicorn on a free loopback port (HTTP and WebSocket on one socket, as in production).
Users register and log in through the API; the project, dataset, jobs, export and inference job are
created through the API, and the runners' part (a training run with stored checkpoints) arrives as
published events that the real projector applies. Only the export's completion is written to the
database directly: no exporter runs in these tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from argon2 import PasswordHasher
from fastapi import FastAPI

from visionyard.api.auth import passwords
from visionyard.api.config import ApiSettings
from visionyard.api.db.models_datasets import DatasetSplit
from visionyard.api.db.models_exports import ExportJob
from visionyard.api.main import create_app
from visionyard.shared.bus import Bus
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetReady,
    JobCompleted,
    JobStarted,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.natsserver import free_port

from .conftest import until
from .export_inference_world import install_export_predict_manifest

API = "/api/v1"
PASSWORD = "correct-horse-battery"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-1"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
# Every object of the owner's project carries this in its name: a refused caller must never see it.
MARKER = "zz-private-7f3a"


def authenticated_settings(tmp_path: Path, *, request_timeout: float = 0.5) -> ApiSettings:
    """Authentication on in embedded mode, with a known admin; a tracker/storage call nobody answers fails fast."""
    return ApiSettings(data_dir=tmp_path / "data", outbox_poll_seconds=0.1, anonymous_as_admin=False,
                       request_timeout=request_timeout, admin_email="root@example.com", admin_password="root-password-1")


def cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id at its lowest cost: these tests are about who may call, and the default cost takes
    about a second per hash on a shared CI core (every register and login hashes)."""
    monkeypatch.setattr(passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@asynccontextmanager
async def served(settings: ApiSettings, bus: Bus) -> AsyncIterator[tuple[FastAPI, str]]:
    """The app served by uvicorn on a free loopback port: (app, base URL)."""
    app = create_app(settings, bus=bus)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ws_per_message_deflate=False))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started or serving.done())

    await until(started)
    assert server.started, "uvicorn did not start"
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header of `token` (none for None)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


async def register_and_login(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    """A new user through `/auth/register` and `/auth/login`: its id and tokens."""
    registered = await http.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD,
                                                               "full_name": email.split("@")[0]})
    assert registered.status_code == 201, registered.text
    return {"id": registered.json()["id"], "email": email, **await login(http, email, PASSWORD)}


async def login(http: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    """Tokens from the OAuth2 password form (multipart, as the frontend sends it)."""
    answer = await http.post(f"{API}/auth/login", files={"username": (None, email), "password": (None, password)})
    assert answer.status_code == 200, answer.text
    return {"token": answer.json()["access_token"], "refresh_token": answer.json()["refresh_token"]}


@dataclass
class World:
    """The served app, its users (by role) and the ids of the owner's objects."""

    app: FastAPI
    base_url: str
    http: httpx.AsyncClient
    bus: Bus
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)

    def token(self, role: str) -> str | None:
        """The access token of the user playing `role` (None for "anonymous")."""
        return None if role == "anonymous" else self.users[role]["token"]

    async def call(self, role: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request as `role`."""
        headers = {**kwargs.pop("headers", {}), **bearer(self.token(role))}
        return await self.http.request(method, path, headers=headers, **kwargs)


async def ready_dataset(world: World, role: str, *, name: str, project_id: int | None,
                        content_hash: str = "hash-1") -> str:
    """A dataset made ready by storage's `DatasetReady` (applied by the real projector)."""
    body: dict[str, Any] = {"name": name, "visibility": "private"}
    if project_id is not None:
        body["project_id"] = project_id
    created = await world.call(role, "POST", f"{API}/datasets", json=body)
    assert created.status_code == 201, created.text
    dataset_id: str = created.json()["dataset_id"]
    await world.bus.publish(DatasetReady(
        dataset_id=dataset_id, content_hash=content_hash, format="imagefolder", num_images=30, num_classes=3,
        class_names=["0", "1", "2"], size_bytes=4096, uri="file:///store/datasets/d.zip",
    ))

    async def is_ready() -> bool:
        answer = await world.call(role, "GET", f"{API}/datasets/{dataset_id}")
        return bool(answer.json()["status"] == "ready")

    await until(is_ready)
    return dataset_id


# Epoch 1's validation as the classifier reports it: 15 images, one "1" taken for a "0" (listed first).
VALIDATION_CONFUSION = [[5, 0, 0], [1, 4, 0], [0, 0, 5]]
VALIDATION_IMAGES = [("1/img5.png", 1, 0, 0.61)] + [
    (f"{true}/img{index}.png", true, true, 0.9) for true, index in
    [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 6), (1, 7), (1, 8), (1, 9), (2, 10), (2, 11), (2, 12), (2, 13), (2, 14)]
]


def validation_report(epoch: int) -> dict[str, Any]:
    """The data of a `validation_result` log event: per-class metrics, confusion matrix and each image's prediction."""
    return {"epoch": epoch, "class_names": ["0", "1", "2"], "confusion_matrix": VALIDATION_CONFUSION,
            "per_class_metrics": [{"class_name": str(i), "precision": 0.9, "recall": 0.9, "f1": 0.9} for i in range(3)],
            "image_results": {"total": len(VALIDATION_IMAGES), "images": [row[0] for row in VALIDATION_IMAGES],
                              "true": [row[1] for row in VALIDATION_IMAGES],
                              "predicted": [row[2] for row in VALIDATION_IMAGES],
                              "confidence": [row[3] for row in VALIDATION_IMAGES]}}


async def completed_job(world: World, role: str, *, dataset_id: str, project_id: int | None, name: str) -> int:
    """A training job driven to `completed` by a runner's events, in the classifier trainer's order: each
    epoch reports progress, then its `last` checkpoint (and `best` when it improved) is stored; logs and a
    validation result of epoch 1 on the way."""
    body: dict[str, Any] = {"experiment_name": name, "config": {
        "framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
        "dataset_id": dataset_id, "epochs": 2}}
    if project_id is not None:
        body["project_id"] = project_id
    created = await world.call(role, "POST", f"{API}/training/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id: int = created.json()["id"]
    started = await world.call(role, "POST", f"{API}/training/jobs/{job_id}/start")
    assert started.status_code == 200, started.text
    key = str(job_id)
    seq = iter(range(1, 100))

    def stored(kind: str, epoch: int) -> list[Any]:
        number = next(seq)
        return [
            CheckpointStaged(job_id=key, attempt=1, seq=number, checkpoint_kind=kind, epoch=epoch, size_bytes=12,
                             object_name=f"ckpt/{key}/1/{number}-{kind}.pt", sha256=f"{number:064d}"),
            # Storage keeps one object per kind: checkpoints/<job>/<kind>.pt.
            ArtifactStored(job_id=key, attempt=1, seq=number, checkpoint_kind=kind, epoch=epoch, size_bytes=12,
                           uri=f"file:///store/checkpoints/{key}/{kind}.pt", sha256=f"{number:064d}"),
        ]

    events: list[Any] = [
        JobStarted(job_id=key, attempt=1, seq=next(seq), runner_id="r1"),
        ProgressReported(job_id=key, attempt=1, seq=next(seq), epoch=1, total_epochs=2,
                         metrics={"loss": 0.9, "accuracy": 0.5, "learning_rate": 0.01}),
        *stored("last", 1),
        *stored("best", 1),
        LogEmitted(job_id=key, attempt=1, seq=next(seq), message="epoch 1 done", event_type="stdout"),
        LogEmitted(job_id=key, attempt=1, seq=next(seq), message="validation of epoch 1",
                   event_type="validation_result", data=validation_report(1)),
        ProgressReported(job_id=key, attempt=1, seq=next(seq), epoch=2, total_epochs=2,
                         metrics={"loss": 0.4, "accuracy": 0.9, "learning_rate": 0.01}),
        *stored("last", 2),
        *stored("best", 2),
        JobCompleted(job_id=key, attempt=1, seq=next(seq), total_epochs_completed=2, final_metrics={"accuracy": 0.9},
                     best_metrics={"accuracy": 0.9}, best_epoch=2, declared_checkpoints=["best", "last"]),
    ]
    for event in events:
        await world.bus.publish(event)

    async def completed() -> bool:
        answer = await world.call(role, "GET", f"{API}/training/jobs/{job_id}")
        return bool(answer.json()["status"] == "completed")

    await until(completed)
    return job_id


async def export_job(world: World, role: str, training_job_id: int) -> int:
    """A pending onnx export of a completed training job."""
    created = await world.call(role, "POST", f"{API}/export/jobs",
                               json={"training_job_id": training_job_id, "export_format": "onnx"})
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def mark_export_completed(world: World, export_id: int) -> None:
    """What the exporter and storage would leave: a completed export with a stored package.

    Blocking: run it in a thread. The outbox relay holds SQLite's write lock while it awaits a PubAck
    on the event loop, so a write made on the loop itself would wait for the relay, and the relay for it.
    """
    with world.app.state.session_factory() as session, session.begin():
        row = session.get(ExportJob, str(export_id))
        assert row is not None
        row.status, row.exporter_done, row.validation_passed = "completed", True, True
        row.export_path = f"file:///store/exports/{export_id}/package.zip"
        row.package_sha256, row.file_size_bytes = "c" * 64, 2048


def store_split(world: World, dataset_id: str) -> None:
    """A configured split of the dataset's version (setting one through the API needs storage's file list)."""
    with world.app.state.session_factory() as session, session.begin():
        session.add(DatasetSplit(dataset_id=dataset_id, content_hash="hash-1", method="manual", default_ratio=[0.8, 0.2],
                                 seed=42, requested={}, assignment={"train": ["0/a.png"], "val": ["1/b.png"]}))


async def default_project_id(world: World, role: str) -> int:
    """The id of the user's own "Uncategorized" project."""
    projects = (await world.call(role, "GET", f"{API}/projects")).json()
    return next(p["id"] for p in projects if p["name"] == "Uncategorized" and p["user_role"] == "owner")


async def populate(world: World) -> None:
    """Users owner/member/viewer/stranger/leaver; the owner's project with every kind of object in it."""
    await install_export_predict_manifest(world.bus)
    for role in ("owner", "member", "viewer", "stranger", "leaver"):
        world.users[role] = await register_and_login(world.http, f"{role}-{uuid.uuid4().hex[:6]}@example.com")
    created = await world.call("owner", "POST", f"{API}/projects",
                               json={"name": f"{MARKER}-project", "description": f"{MARKER} notes", "task_type": None})
    assert created.status_code == 201, created.text
    project = created.json()["id"]
    ids = world.ids
    ids["project"] = project
    for role, as_role in (("member", "member"), ("viewer", "viewer"), ("leaver", "viewer")):
        added = await world.call("owner", "POST", f"{API}/projects/{project}/members",
                                 json={"email": world.users[role]["email"], "role": as_role})
        assert added.status_code == 201, added.text
    ids["dataset"] = await ready_dataset(world, "owner", name=f"{MARKER}-digits", project_id=project)
    await asyncio.to_thread(store_split, world, ids["dataset"])
    ids["job"] = await completed_job(world, "owner", dataset_id=ids["dataset"], project_id=project,
                                     name=f"{MARKER}-experiment")
    # The state-changing training routes act on their own job, so the reads above keep a completed one.
    ids["spare_job"] = await completed_job(world, "owner", dataset_id=ids["dataset"], project_id=project,
                                           name=f"{MARKER}-spare")
    ids["export"] = await export_job(world, "owner", ids["job"])
    await asyncio.to_thread(mark_export_completed, world, ids["export"])
    # Deployments of the completed export: the endpoint every read and switch acts on, and one per caller
    # whose delete may succeed.
    for name in ("deployment", "deployment_member", "deployment_owner"):
        made = await world.call("owner", "POST", f"{API}/export/deployments", json={
            "export_job_id": ids["export"], "deployment_type": "platform_endpoint",
            "deployment_config": {"auto_activate": True}})
        assert made.status_code == 201, made.text
        ids[name] = made.json()["id"]
        ids[f"{name}_key"] = made.json()["deployment_config"]["api_key"]
    images = await world.call("owner", "GET", f"{API}/validation/jobs/{ids['job']}/results/1/images")
    assert images.status_code == 200, images.text
    ids["validation_image"] = images.json()["images"][0]["id"]
    inference = await world.call("owner", "POST", f"{API}/test_inference/inference/jobs",
                                 json={"training_job_id": ids["job"], "inference_type": "dataset",
                                       "input_data": {"dataset_split": "val"}})
    assert inference.status_code == 201, inference.text
    ids["inference"] = inference.json()["id"]
    created = await world.call("owner", "POST", f"{API}/datasets",
                               json={"name": f"{MARKER}-uploads", "project_id": project})
    assert created.status_code == 201, created.text
    ids["upload_dataset"] = created.json()["dataset_id"]
    # What deletes act on: one of each per caller that may succeed, so no call undoes another's.
    for role in ("member", "owner"):
        empty = await world.call("owner", "POST", f"{API}/datasets",
                                 json={"name": f"{MARKER}-empty-{role}", "project_id": project})
        assert empty.status_code == 201, empty.text
        ids[f"empty_dataset_{role}"] = empty.json()["dataset_id"]
        cancelled = await export_job(world, "owner", ids["job"])
        assert (await world.call("owner", "POST", f"{API}/export/jobs/{cancelled}/cancel")).status_code == 200
        ids[f"cancelled_export_{role}"] = cancelled
    for role in ("owner", "member", "viewer", "stranger"):
        world.users[role]["default_project"] = await default_project_id(world, role)
        key = await world.call(role, "POST", f"{API}/auth/api-keys",
                               json={"name": "ci", "project_ids": [world.users[role]["default_project"]]})
        assert key.status_code == 201, key.text
        world.users[role]["api_key_id"] = key.json()["id"]


@asynccontextmanager
async def world_of(settings: ApiSettings, bus: Bus, *, populated: bool = True) -> AsyncIterator[World]:
    """A served app, and (when `populated`) its users and the owner's project."""
    async with served(settings, bus) as (app, base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            world = World(app=app, base_url=base_url, http=http, bus=bus)
            if populated:
                await populate(world)
            yield world
