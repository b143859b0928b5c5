"""Per-image validation results: the trainer's report projected into rows (idempotently, newest attempt wins),
listed by confusion-matrix cell, and each image served from the job's pinned dataset version to its project's
readers only."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import LogEmitted
from visionyard.shared.requests import ImageEntry, ListImagesReply, ListImagesRequest, ReadImageReply, ReadImageRequest

from ..access_world import (
    API,
    PNG,
    VALIDATION_IMAGES,
    World,
    authenticated_settings,
    cheap_password_hashing,
    validation_report,
    world_of,
)
from ..conftest import FakeServices, until

pytestmark = pytest.mark.integration


@pytest.fixture
async def world(bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """The served app (authentication on) with owner/viewer/stranger and a job whose epoch 1 reported 15 images."""
    cheap_password_hashing(monkeypatch)
    settings = authenticated_settings(tmp_path)
    async with world_of(settings, bus) as built:
        yield built


def _images(world: World, role: str, job: Any, epoch: int, **params: Any) -> Any:
    return world.call(role, "GET", f"{API}/validation/jobs/{job}/results/{epoch}/images", params=params)


async def test_the_list_is_the_trainers_report_by_cell_and_page(world: World) -> None:
    job = world.ids["job"]
    every = (await _images(world, "viewer", job, 1, limit=1000)).json()
    assert every["total_count"] == every["reported_images"] == every["validated_images"] == 15 and every["complete"]
    assert [(row["image_path"], row["true_label_id"], row["predicted_label_id"], row["confidence"])
            for row in every["images"]] == [tuple(item) for item in VALIDATION_IMAGES]
    # Rebuilt from the rows, the confusion matrix is the one the results view shows.
    matrix = (await world.call("viewer", "GET", f"{API}/validation/jobs/{job}/results/1")).json()["confusion_matrix"]
    for true, row in enumerate(matrix):
        for predicted, count in enumerate(row):
            cell = (await _images(world, "viewer", job, 1, true_label_id=true, predicted_label_id=predicted)).json()
            assert cell["total_count"] == count == len(cell["images"])
            assert all(image["true_label"] == str(true) and image["predicted_label"] == str(predicted)
                       for image in cell["images"])
    wrong = (await _images(world, "viewer", job, 1, correct=False)).json()
    assert [row["image_path"] for row in wrong["images"]] == ["1/img5.png"] and wrong["images"][0]["is_correct"] is False
    pages = [(await _images(world, "viewer", job, 1, skip=skip, limit=4)).json()["images"] for skip in (0, 4, 8, 12)]
    assert [row["id"] for page in pages for row in page] == [row["id"] for row in every["images"]]
    assert every["images"][0]["image_url"].endswith(f"/api/v1/validation/images/{every['images'][0]['id']}")

    none = await _images(world, "viewer", job, 2)
    assert none.status_code == 404 and "epoch" in none.json()["detail"]
    assert (await _images(world, "stranger", job, 1)).status_code == 404
    assert (await _images(world, "anonymous", job, 1)).status_code == 401
    bad = await _images(world, "viewer", job, 1, true_label_id=-1)
    assert bad.status_code == 422 and "true_label_id" in bad.json()["detail"]


async def _publish_report(world: World, job: int, *, attempt: int, seq: int, data: dict[str, Any] | None) -> None:
    await world.bus.publish(LogEmitted(job_id=str(job), attempt=attempt, seq=seq, message="validation",
                                       event_type="validation_result", data=data))

    async def logged() -> bool:
        return (attempt, seq) in {(line["attempt"], line["seq"]) for line in await _report_lines(world, job)}

    await until(logged)


async def _report_lines(world: World, job: int) -> list[dict[str, Any]]:
    answer = await world.call("owner", "GET", f"{API}/training/jobs/{job}/logs",
                              params={"log_type": "validation_result", "limit": 100})
    lines: list[dict[str, Any]] = answer.json()
    return lines


async def test_a_redelivered_report_keeps_the_ids_and_a_newer_attempt_replaces_them(world: World) -> None:
    job = world.ids["job"]
    before = (await _images(world, "owner", job, 1, limit=100)).json()["images"]
    # The same event again (a redelivery: another message id, the same job, attempt and seq).
    seq = 100
    await _publish_report(world, job, attempt=1, seq=seq, data=validation_report(1))
    first = (await _images(world, "owner", job, 1, limit=100)).json()["images"]
    await world.bus.publish(LogEmitted(job_id=str(job), attempt=1, seq=seq, message="validation",
                                       event_type="validation_result", data=validation_report(1)))
    marker = 101
    await _publish_report(world, job, attempt=1, seq=marker, data={"epoch": 7, "class_names": ["0", "1", "2"],
                                                                   "confusion_matrix": [[1, 0, 0], [0, 0, 0], [0, 0, 0]]})
    again = (await _images(world, "owner", job, 1, limit=100)).json()["images"]
    assert [row["id"] for row in again] == [row["id"] for row in first]
    assert [row["image_path"] for row in first] == [row["image_path"] for row in before]
    # No per-image report for epoch 7: said so, naming the epoch.
    silent = await _images(world, "owner", job, 7)
    assert silent.status_code == 404 and "reported no per-image results for epoch 7" in silent.json()["detail"]

    # A capped report is marked incomplete; a malformed one keeps its log line and stores no rows.
    capped = validation_report(3)
    capped["image_results"] = {**capped["image_results"], "total": 360}
    await _publish_report(world, job, attempt=1, seq=102, data=capped)
    page = (await _images(world, "owner", job, 3)).json()
    assert (page["reported_images"], page["validated_images"], page["complete"]) == (15, 360, False)
    broken = validation_report(4)
    broken["image_results"]["true"] = broken["image_results"]["true"][:-1]
    await _publish_report(world, job, attempt=1, seq=103, data=broken)
    assert (await _images(world, "owner", job, 4)).status_code == 404
    assert (await world.call("owner", "GET", f"{API}/validation/jobs/{job}/results/4")).status_code == 200
    # The log lines keep the counts (or why there are no rows), not the arrays.
    kept = {line["seq"]: line["data"]["image_results"] for line in await _report_lines(world, job)
            if "image_results" in (line["data"] or {})}
    assert kept[100] == {"reported": 15, "total": 15} and kept[102] == {"reported": 15, "total": 360}
    assert "differ in length" in kept[103]["error"]


async def test_an_image_is_served_from_the_pinned_version_to_readers_only(world: World,
                                                                          fake_services: FakeServices) -> None:
    job = world.ids["job"]
    rows = (await _images(world, "viewer", job, 1, limit=100)).json()["images"]
    asked: list[ReadImageRequest] = []

    async def storage_lists(request: ListImagesRequest) -> ListImagesReply:
        return ListImagesReply(ok=True, total_images=1, images=[ImageEntry(filename=rows[0]["image_path"], size=len(PNG))])

    async def storage_reads(request: ReadImageRequest) -> ReadImageReply:
        asked.append(request)
        return ReadImageReply(ok=True, content_b64=base64.b64encode(PNG).decode(), content_type="image/png",
                              size=len(PNG))

    await fake_services.answer("storage", {subjects.STORAGE_LIST_IMAGES: storage_lists,
                                           subjects.STORAGE_READ_IMAGE: storage_reads})
    image = await world.call("viewer", "GET", f"{API}/validation/images/{rows[0]['id']}")
    assert image.status_code == 200 and image.content == PNG
    assert [(a.dataset_id, a.content_hash, a.filename) for a in asked] == [(world.ids["dataset"], "hash-1",
                                                                           rows[0]["image_path"])]
    for role, status in (("stranger", 404), ("anonymous", 401)):
        assert (await world.call(role, "GET", f"{API}/validation/images/{rows[0]['id']}")).status_code == status
    missing = await world.call("viewer", "GET", f"{API}/validation/images/987654")
    assert missing.status_code == 404 and "image_id" in missing.json()["detail"]
