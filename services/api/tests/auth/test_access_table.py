"""Who may call what, route by route: every served route is classified, and every project-scoped one
is walked as no one, a stranger, a viewer, a member and the owner (authentication on).

The table below is the access contract. A route the app serves that is not in it fails
`test_every_served_route_is_classified`, so a new route cannot ship without deciding who may call it.
Project-scoped routes refuse a stranger exactly as a missing object (404, never the object's data),
let a viewer read but not write (403), and keep member management and project edits to the owner.
The tracker and storage are not running here: their calls answer 503 quickly, which counts as having
passed the access check.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from visionyard.api.config import ApiSettings
from visionyard.api.main import create_app
from visionyard.shared.bus import Bus
from visionyard.shared.events import LogEmitted

from ..access_world import API, MARKER, PASSWORD, PNG, World, authenticated_settings, cheap_password_hashing, world_of

pytestmark = pytest.mark.integration

PUBLIC = "public"  # anyone, no credential needed
SELF = "self"  # any signed-in user, about their own account or what they may see
READ = "project-read"  # members of the object's project, viewers included
WRITE = "project-write"  # members and owners of the object's project, not viewers
OWNER = "project-owner"  # the project's owners only
LIVE = "websocket"  # the live socket: walked by test_websocket_subscription_needs_project_access
KEY = "deployment-key"  # a deployment's endpoint: its own key only, never a user's credential (test_deployments.py)

CALLERS = ("anonymous", "stranger", "viewer", "member", "owner")
MISSING_JOB = 987_654
MISSING_DATASET = "0" * 32


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("0/a.png", PNG)
    return buffer.getvalue()


Body = Callable[[World, str], Any]


@dataclass(frozen=True)
class Case:
    """One call of one route, and who may make it.

    `objects` names which of the world's objects a path parameter takes; "{role}" picks the caller's
    own copy (for deletes, so one caller's success does not turn the next one's call into a 404).
    """

    method: str
    path: str
    access: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Body | None = None
    files: Body | None = None
    objects: dict[str, str] = field(default_factory=dict)
    lists_objects: bool = False  # a listing: a stranger gets 200, without the project's objects

    @property
    def route(self) -> tuple[str, str]:
        """(method, path) as the OpenAPI document names it."""
        return self.method, self.path


def _const(value: Any) -> Body:
    return lambda world, role: value


def _job_body(world: World, role: str) -> dict[str, Any]:
    return {"project_id": world.ids["project"], "experiment_name": f"by-{role}", "config": {
        "framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
        "dataset_id": world.ids["dataset"], "epochs": 1}}


def _login_form(world: World, role: str) -> dict[str, Any]:
    return {"username": (None, world.users["owner"]["email"]), "password": (None, PASSWORD)}


SPARE = {"job_id": "spare_job"}

TABLE: list[Case] = [
    # -- accounts ------------------------------------------------------------------------------------
    Case("POST", f"{API}/auth/login", PUBLIC, files=_login_form),
    Case("POST", f"{API}/auth/refresh", PUBLIC,
         json=lambda world, role: {"refresh_token": world.users["owner"]["refresh_token"]}),
    Case("POST", f"{API}/auth/register", PUBLIC,
         json=lambda world, role: {"email": f"new-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD}),
    Case("GET", f"{API}/auth/me", SELF),
    Case("PUT", f"{API}/auth/me", SELF, json=_const({"bio": "likes access tables"})),
    Case("POST", f"{API}/auth/api-keys", SELF,
         json=lambda world, role: {"name": "walk", "project_ids": [world.users[role]["default_project"]]}),
    Case("GET", f"{API}/auth/api-keys", SELF),
    Case("DELETE", f"{API}/auth/api-keys/{{key_id}}", SELF),
    # -- projects ------------------------------------------------------------------------------------
    Case("GET", f"{API}/projects", SELF, lists_objects=True),
    Case("POST", f"{API}/projects", SELF, json=lambda world, role: {"name": f"{role}-{uuid.uuid4().hex[:6]}"}),
    Case("GET", f"{API}/projects/{{project_id}}", READ),
    Case("PUT", f"{API}/projects/{{project_id}}", OWNER, json=_const({"description": f"{MARKER} edited"})),
    Case("DELETE", f"{API}/projects/{{project_id}}", OWNER),  # the owner's answer: 409, it is not empty
    Case("GET", f"{API}/projects/{{project_id}}/experiments", READ),
    Case("GET", f"{API}/projects/{{project_id}}/members", READ),
    Case("POST", f"{API}/projects/{{project_id}}/members", OWNER,
         json=lambda world, role: {"email": world.users["leaver"]["email"], "role": "viewer"}),
    Case("DELETE", f"{API}/projects/{{project_id}}/members/{{user_id}}", OWNER),
    # -- queues: a project's weight and quotas are its owners' (or an admin's) to set -----------------
    Case("GET", f"{API}/projects/{{project_id}}/scheduling", READ),
    Case("PUT", f"{API}/projects/{{project_id}}/scheduling", OWNER, json=_const({"weight": 2, "max_running_jobs": 8})),
    Case("GET", f"{API}/queues", SELF, lists_objects=True),
    Case("GET", f"{API}/queues/depth", PUBLIC),  # totals only, for autoscalers (like /metrics)
    # -- training ------------------------------------------------------------------------------------
    Case("POST", f"{API}/training/jobs", WRITE, json=_job_body),
    Case("GET", f"{API}/training/jobs", SELF, lists_objects=True),
    Case("GET", f"{API}/training/jobs", READ, params={"project_id": "{project}"}),
    Case("GET", f"{API}/training/jobs/{{job_id}}", READ),
    # In this order a member's call succeeds on the spare job (restart queues it, start answers it as is,
    # cancel stops it, resume queues it again); the owner's same call then often answers 409.
    Case("POST", f"{API}/training/jobs/{{job_id}}/restart", WRITE, objects=SPARE),
    Case("POST", f"{API}/training/jobs/{{job_id}}/start", WRITE, objects=SPARE),
    Case("POST", f"{API}/training/jobs/{{job_id}}/cancel", WRITE, objects=SPARE),
    Case("POST", f"{API}/training/jobs/{{job_id}}/resume", WRITE, objects=SPARE),
    Case("PATCH", f"{API}/training/jobs/{{job_id}}/priority", WRITE, objects=SPARE, json=_const({"priority": "high"})),
    Case("GET", f"{API}/training/jobs/{{job_id}}/status", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/metrics", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/metric-schema", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/logs", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/checkpoints", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/mlflow/metrics", READ),
    Case("GET", f"{API}/training/jobs/{{job_id}}/mlflow/summary", READ),
    # -- the trainers' catalogue (no user data) -------------------------------------------------------
    Case("GET", f"{API}/training/config-schema", PUBLIC, params={"framework": "pytorch"}),
    Case("GET", f"{API}/models/list", PUBLIC),
    Case("GET", f"{API}/models/get", PUBLIC, params={"framework": "pytorch", "model_name": "simple_cnn"}),
    Case("GET", f"{API}/models/capabilities/{{framework}}", PUBLIC),
    Case("GET", f"{API}/models/{{framework}}/{{model_name}}", PUBLIC),
    Case("GET", f"{API}/models/{{framework}}/{{model_name}}/guide", PUBLIC),
    Case("POST", f"{API}/training/config/validate", PUBLIC, json=_const({"framework": "pytorch", "epochs": 3})),
    # -- datasets ------------------------------------------------------------------------------------
    Case("POST", f"{API}/datasets", WRITE,
         json=lambda world, role: {"name": f"by-{role}", "project_id": world.ids["project"]}),
    Case("POST", f"{API}/datasets/upload", WRITE,
         files=lambda world, role: {"file": ("d.zip", _zip(), "application/zip"),
                                    "project_id": (None, str(world.ids["project"]))}),
    Case("GET", f"{API}/datasets/available", SELF, lists_objects=True),
    # The path names a dataset of the caller's projects (never a host path): another project's is not found.
    Case("POST", f"{API}/datasets/analyze", READ, json=lambda world, role: {"path": world.ids["dataset"]}),
    Case("GET", f"{API}/datasets/{{dataset_id}}", READ),
    Case("DELETE", f"{API}/datasets/{{dataset_id}}", WRITE, objects={"dataset_id": "empty_dataset_{role}"}),
    Case("POST", f"{API}/datasets/{{dataset_id}}/split", WRITE, json=_const({"method": "auto"})),
    Case("GET", f"{API}/datasets/{{dataset_id}}/split", READ),
    Case("POST", f"{API}/datasets/{{dataset_id}}/snapshot", WRITE, json=_const({})),
    Case("GET", f"{API}/datasets/{{dataset_id}}/snapshots", READ),
    Case("GET", f"{API}/datasets/{{dataset_id}}/images", READ),
    Case("GET", f"{API}/datasets/{{dataset_id}}/images/{{filename}}/url", READ),
    Case("GET", f"{API}/datasets/{{dataset_id}}/images/{{filename}}/content", READ),
    Case("POST", f"{API}/datasets/{{dataset_id}}/upload", WRITE, objects={"dataset_id": "upload_dataset"},
         files=_const({"file": ("d.zip", _zip(), "application/zip")})),
    Case("POST", f"{API}/datasets/{{dataset_id}}/upload-images", WRITE, objects={"dataset_id": "upload_dataset"},
         files=_const([("files", ("0/a.png", PNG, "image/png"))])),
    # -- export --------------------------------------------------------------------------------------
    Case("GET", f"{API}/export/capabilities", READ, params={"training_job_id": "{job}"}),
    Case("GET", f"{API}/export/capabilities", SELF, params={"framework": "pytorch", "task_type": "classification"}),
    Case("POST", f"{API}/export/jobs", WRITE,
         json=lambda world, role: {"training_job_id": world.ids["job"], "export_format": "onnx"}),
    Case("GET", f"{API}/export/training/{{training_job_id}}/exports", READ),
    Case("GET", f"{API}/export/jobs/{{export_job_id}}", READ),
    Case("DELETE", f"{API}/export/jobs/{{export_job_id}}", WRITE,
         objects={"export_job_id": "cancelled_export_{role}"}),
    Case("POST", f"{API}/export/jobs/{{export_job_id}}/cancel", WRITE),
    Case("GET", f"{API}/export/{{export_job_id}}/download", READ),
    Case("GET", f"{API}/export/{{export_job_id}}/package", READ),
    # -- deployments ---------------------------------------------------------------------------------
    Case("GET", f"{API}/export/deployments", SELF, lists_objects=True),
    Case("GET", f"{API}/export/deployments", READ, params={"training_job_id": "{job}"}),
    Case("POST", f"{API}/export/deployments", WRITE,
         json=lambda world, role: {"export_job_id": world.ids["export"], "deployment_type": "download"}),
    Case("PATCH", f"{API}/export/deployments/{{deployment_id}}/deactivate", WRITE),
    Case("PATCH", f"{API}/export/deployments/{{deployment_id}}/activate", WRITE),
    Case("DELETE", f"{API}/export/deployments/{{deployment_id}}", WRITE, objects={"deployment_id": "deployment_{role}"}),
    Case("GET", f"{API}/deployments/{{deployment_id}}", READ),
    Case("POST", f"{API}/deployments/{{deployment_id}}/predict", KEY,
         json=_const({"image": "iVBORw0KGgo="})),
    # -- test inference ------------------------------------------------------------------------------
    Case("POST", f"{API}/test_inference/inference/upload-images", WRITE, params={"training_job_id": "{job}"},
         files=_const([("files", ("a.png", PNG, "image/png"))])),
    Case("POST", f"{API}/test_inference/inference/upload-images", SELF,
         files=_const([("files", ("a.png", PNG, "image/png"))])),
    Case("POST", f"{API}/test_inference/inference/upload-image", SELF, params={"session_id": "walk-session"},
         files=_const({"file": ("a.png", PNG, "image/png")})),
    # Past the access check the image is refused (422 naming image_path): no upload of the caller's is named.
    Case("POST", f"{API}/test_inference/inference/quick", WRITE,
         params={"training_job_id": "{job}", "image_path": "file:///store/inference/none.png"}),
    Case("DELETE", f"{API}/test_inference/inference/session/{{session_id}}", SELF),
    Case("POST", f"{API}/test_inference/inference/jobs", WRITE,
         json=lambda world, role: {"training_job_id": world.ids["job"], "inference_type": "dataset",
                                   "input_data": {"dataset_split": "val"}}),
    Case("POST", f"{API}/test_inference/inference/jobs/{{inference_job_id}}/cancel", WRITE),
    Case("GET", f"{API}/test_inference/inference/jobs/detail/{{inference_job_id}}", READ),
    Case("GET", f"{API}/test_inference/inference/jobs/{{inference_job_id}}/results", READ),
    Case("GET", f"{API}/test_inference/inference/jobs/{{training_job_id}}", READ),
    # -- validation views ----------------------------------------------------------------------------
    Case("GET", f"{API}/validation/jobs/{{job_id}}/summary", READ),
    Case("GET", f"{API}/validation/jobs/{{job_id}}/results/{{epoch}}", READ),
    Case("GET", f"{API}/validation/jobs/{{job_id}}/results/{{epoch}}/images", READ),
    Case("GET", f"{API}/validation/images/{{image_id}}", READ),
    # -- live ----------------------------------------------------------------------------------------
    Case("WS", f"{API}/ws/training", LIVE),
    Case("GET", f"{API}/ws/stats", SELF),
    # -- operations ----------------------------------------------------------------------------------
    Case("GET", "/health", PUBLIC),
    Case("GET", "/health/ready", PUBLIC),
    Case("GET", "/metrics", PUBLIC),
    Case("GET", "/asyncapi.json", PUBLIC),
    Case("GET", "/asyncapi", PUBLIC),
]


# -- which routes the app serves ------------------------------------------------------------------


def _served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document, plus routes left out of it and every WebSocket route."""
    served = {(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations}

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:  # FastAPI keeps included routers as such
                walk(included.routes, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))
                continue
            path = prefix + re.sub(r"\{(\w+):\w+\}", r"{\1}", getattr(route, "path", ""))
            if isinstance(route, APIWebSocketRoute):
                served.add(("WS", path))
            elif isinstance(route, APIRoute):
                served.update((method, path) for method in route.methods - {"HEAD"})

    walk(list(app.routes), "")
    return served


def test_every_served_route_is_classified(tmp_path: Path) -> None:
    app = create_app(ApiSettings(data_dir=tmp_path / "data", anonymous_as_admin=False))
    served = _served_routes(app)
    assert ("WS", f"{API}/ws/training") in served and ("GET", "/metrics") in served  # the walk sees both kinds
    classified = {case.route for case in TABLE}
    unclassified = sorted(served - classified)
    assert not unclassified, f"routes nobody classified in TABLE (decide who may call them): {unclassified}"
    gone = sorted(classified - served)
    assert not gone, f"TABLE names routes the app no longer serves: {gone}"


# -- walking the table ----------------------------------------------------------------------------


@pytest.fixture
def auth_settings(tmp_path: Path) -> ApiSettings:
    """Authentication on in embedded mode; a tracker/storage call nobody answers fails fast (503)."""
    return authenticated_settings(tmp_path, request_timeout=0.3)


@pytest.fixture
async def world(bus: Bus, auth_settings: ApiSettings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """The served app with the owner's project, its members and a stranger."""
    cheap_password_hashing(monkeypatch)
    async with world_of(auth_settings, bus) as built:
        yield built


def _object(world: World, name: str, role: str, case: Case) -> Any:
    chosen = case.objects.get(name)
    if chosen is not None:
        # Refused callers touch the owner's copy: had they been let through, the owner's call shows it.
        return world.ids[chosen.format(role=role if role in ("member", "owner") else "owner")]
    defaults = {"project_id": "project", "job_id": "job", "dataset_id": "dataset", "export_job_id": "export",
                "inference_job_id": "inference", "training_job_id": "job", "deployment_id": "deployment",
                "image_id": "validation_image"}
    if name in defaults:
        return world.ids[defaults[name]]
    if name == "user_id":
        return world.users["leaver"]["id"]
    if name == "key_id":
        return world.users[role]["api_key_id"]
    if name == "filename":
        return "0/a.png"
    if name == "framework":
        return "pytorch"
    if name == "model_name":
        return "simple_cnn"
    if name == "epoch":
        return 1
    if name == "session_id":
        return "walk-session"
    raise AssertionError(f"{case.method} {case.path}: no object for path parameter {name!r}")


def _request(world: World, case: Case, role: str) -> tuple[str, dict[str, Any]]:
    user_role = "owner" if role == "anonymous" else role
    path = re.sub(r"\{(\w+)\}", lambda match: str(_object(world, match.group(1), user_role, case)), case.path)
    params = {key: str(world.ids[value[1:-1]]) if isinstance(value, str) and value.startswith("{") else value
              for key, value in case.params.items()}
    kwargs: dict[str, Any] = {"params": params}
    if case.json is not None:
        kwargs["json"] = case.json(world, user_role)
    if case.files is not None:
        kwargs["files"] = case.files(world, user_role)
    return path, kwargs


def _validation_error(answer: httpx.Response) -> bool:
    """A 422 of request validation: the table's request is wrong, so it says nothing about access."""
    if answer.status_code != 422:
        return False
    try:
        return "errors" in answer.json()
    except ValueError:
        return False


def _passed(answer: httpx.Response) -> bool:
    """Whether the caller got past the access check: not refused, not hidden, no server error but a
    collaborator's outage (503)."""
    return answer.status_code not in (401, 403, 404) and (answer.status_code < 500 or answer.status_code == 503) \
        and not _validation_error(answer)


def _expectation(case: Case, role: str) -> tuple[str, Callable[[httpx.Response], bool]]:
    if case.access == PUBLIC:
        return "2xx", lambda answer: answer.is_success
    if case.access == KEY:
        # No user's token (the owner's included) opens a deployment's endpoint.
        return "401", lambda answer: answer.status_code == 401 and MARKER not in answer.text
    if role == "anonymous":
        return "401", lambda answer: answer.status_code == 401
    refused = {"stranger": "404"}
    if case.access == SELF:
        return "past the access check", _passed
    if case.access in (WRITE, OWNER):
        refused["viewer"] = "403"
    if case.access == OWNER:
        refused["member"] = "403"
    wanted = refused.get(role)
    if wanted is None:
        return "past the access check", _passed
    return wanted, lambda answer: answer.status_code == int(wanted) and MARKER not in answer.text


async def test_every_route_refuses_strangers_and_viewer_writes_and_lets_members_through(world: World) -> None:
    problems: list[str] = []
    walked = 0
    for case in TABLE:
        if case.access == LIVE:
            continue
        for role in CALLERS:
            path, kwargs = _request(world, case, role)
            answer = await world.call(role, case.method, path, **kwargs)
            walked += 1
            wanted, ok = _expectation(case, role)
            if case.lists_objects and role == "stranger":
                wanted = "a listing without the project's objects"
                ok = lambda answer: answer.status_code == 200 and MARKER not in answer.text  # noqa: E731
            if not ok(answer):
                problems.append(f"{case.method} {path} ({case.access}) as {role}: wanted {wanted}, "
                                f"got {answer.status_code} {answer.text[:160]}")
    assert not problems, f"{len(problems)} of {walked} calls broke the access contract:\n" + "\n".join(problems)


async def test_a_stranger_cannot_tell_another_projects_object_from_a_missing_one(world: World) -> None:
    missing = {"project": MISSING_JOB, "job": MISSING_JOB, "spare_job": MISSING_JOB, "export": MISSING_JOB,
               "inference": MISSING_JOB, "dataset": MISSING_DATASET, "upload_dataset": MISSING_DATASET,
               "empty_dataset_owner": MISSING_DATASET, "cancelled_export_owner": MISSING_JOB,
               "deployment": MISSING_JOB, "deployment_owner": MISSING_JOB, "validation_image": MISSING_JOB}
    nowhere = World(app=world.app, base_url=world.base_url, http=world.http, bus=world.bus, users=world.users,
                    ids={**world.ids, **missing})
    problems: list[str] = []
    compared = 0
    for case in TABLE:
        if case.access not in (READ, WRITE, OWNER) or "{" not in case.path:
            continue
        real_path, kwargs = _request(world, case, "stranger")
        fake_path, fake_kwargs = _request(nowhere, case, "stranger")
        real = await world.call("stranger", case.method, real_path, **kwargs)
        fake = await world.call("stranger", case.method, fake_path, **fake_kwargs)
        compared += 1

        def neutral(answer: httpx.Response, ids: dict[str, Any]) -> tuple[int, str]:
            text = answer.text
            for value in sorted({str(v) for v in ids.values()}, key=len, reverse=True):
                text = text.replace(value, "#")
            return answer.status_code, text

        if neutral(real, world.ids) != neutral(fake, nowhere.ids):
            problems.append(f"{case.method} {case.path}: another project's object answers {real.status_code} "
                            f"{real.text[:120]}, a missing one {fake.status_code} {fake.text[:120]}")
    assert compared > 30
    assert not problems, "a stranger can probe ids:\n" + "\n".join(problems)


async def test_keys_and_memberships_of_others_are_out_of_reach(world: World) -> None:
    owner_key = world.users["owner"]["api_key_id"]
    revoke = await world.call("stranger", "DELETE", f"{API}/auth/api-keys/{owner_key}")
    assert revoke.status_code == 404
    assert any(key["id"] == owner_key and key["revoked_at"] is None
               for key in (await world.call("owner", "GET", f"{API}/auth/api-keys")).json())
    # A key for a project the caller is not in is refused as if the project did not exist.
    made = await world.call("stranger", "POST", f"{API}/auth/api-keys",
                            json={"name": "steal", "project_ids": [world.ids["project"]]})
    assert made.status_code == 404 and MARKER not in made.text
    # A viewer's key reads the project but cannot write in it; a read-only member key cannot either.
    for role, read_only in (("viewer", False), ("member", True)):
        made = await world.call(role, "POST", f"{API}/auth/api-keys",
                                json={"name": "ci", "project_ids": [world.ids["project"]], "read_only": read_only})
        assert made.status_code == 201, made.text
        key = {"X-API-Key": made.json()["key"]}
        job = f"{API}/training/jobs/{world.ids['spare_job']}"
        assert (await world.http.get(job, headers=key)).status_code == 200
        assert (await world.http.post(f"{job}/cancel", headers=key)).status_code == 403
        # Scoped to the project: the caller's own other project is out of the key's reach.
        own = world.users[role]["default_project"]
        assert (await world.http.get(f"{API}/projects/{own}", headers=key)).status_code == 404


async def test_a_download_ticket_opens_its_own_package_only(world: World) -> None:
    export_id = world.ids["export"]
    link = (await world.call("viewer", "GET", f"{API}/export/{export_id}/download")).json()["download_url"]
    ticket = httpx.URL(link).params["ticket"]
    # The ticket stands in for the headers a browser's link cannot carry (storage is down here: 503).
    assert (await world.http.get(f"{API}/export/{export_id}/package", params={"ticket": ticket})).status_code == 503
    other = world.ids["cancelled_export_owner"]
    refused = await world.http.get(f"{API}/export/{other}/package", params={"ticket": ticket})
    assert refused.status_code == 401


# -- the WebSocket --------------------------------------------------------------------------------


def _ws_url(world: World, **query: Any) -> str:
    return str(httpx.URL(world.base_url.replace("http://", "ws://") + f"{API}/ws/training", params=query))


async def _next(socket: ClientConnection) -> dict[str, Any]:
    message = json.loads(await asyncio.wait_for(socket.recv(), timeout=30))
    assert isinstance(message, dict)
    return message


async def test_websocket_subscription_needs_project_access(world: World) -> None:
    job = world.ids["job"]
    for credential in ({}, {"token": "not-a-token"}):
        with pytest.raises(InvalidStatus):
            async with connect(_ws_url(world, job_id=job, last_seq=0, **credential)):
                pass
    async with connect(_ws_url(world, job_id=job, last_seq=0, token=world.token("stranger"))) as stranger, \
            connect(_ws_url(world, job_id=job, token=world.token("viewer"))) as viewer:
        assert (await _next(stranger))["type"] == "connected"
        refused = await _next(stranger)
        assert refused["type"] == "error" and "not found" in refused["message"] and MARKER not in json.dumps(refused)
        await stranger.send(json.dumps({"type": "subscribe", "job_id": job, "last_seq": 0}))
        again = await _next(stranger)
        assert again["type"] == "error" and "not found" in again["message"]
        assert (await _next(viewer))["type"] == "connected"
        assert (await _next(viewer))["type"] == "subscribed"
        await world.bus.publish(LogEmitted(job_id=str(job), attempt=1, seq=50, message=f"{MARKER} live line",
                                           event_type="stdout"))
        live = await _next(viewer)
        while live["type"] != "training_log":  # the job's other live messages (an export's status) may come first
            live = await _next(viewer)
        assert MARKER in live["message"]
        # One writer per connection: anything queued for the stranger would come before this pong.
        await stranger.send(json.dumps({"type": "ping"}))
        assert (await _next(stranger))["type"] == "pong"
    # The viewer's history request is served (the stranger's above was not).
    async with connect(_ws_url(world, job_id=job, last_seq=0, token=world.token("viewer"))) as viewer:
        types = [(await _next(viewer))["type"] for _ in range(2)]
        history = await _next(viewer)
        while history["type"] == "queue_position":  # where a waiting job stands may come before its history
            history = await _next(viewer)
        assert types == ["connected", "subscribed"] and history["type"] == "training_status_change"
