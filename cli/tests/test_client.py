"""The REST client surfaces the API's `detail` and says clearly when nothing answers."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.cli.client import ApiClient, ApiError, ApiUnreachable, websocket_url
from visionyard.cli.dataset_upload import upload_dataset
from visionyard.shared.natsserver import free_port


def test_error_status_shows_the_apis_detail_naming_the_field() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": [{"loc": ["body", "config", "epochs"],
                                                      "msg": "Input should be less than or equal to 1000"}]})

    with ApiClient("http://api.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(ApiError) as raised:
            client.create_job(config={"epochs": 5000})

    assert raised.value.status_code == 422
    assert "config.epochs: Input should be less than or equal to 1000" in str(raised.value)


def test_conflict_detail_string_is_shown_verbatim() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"detail": "job is completed; cannot start"})

    with ApiClient("http://api.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(ApiError, match="409: job is completed; cannot start"):
            client.start_job("j1")


def test_nothing_listening_is_reported_as_unreachable() -> None:
    with ApiClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(ApiUnreachable, match="visionyard up"):
            client.get_job("j1")


def test_websocket_url_follows_the_api_scheme() -> None:
    assert websocket_url("http://127.0.0.1:8000/") == "ws://127.0.0.1:8000/api/v1/ws/training"
    assert websocket_url("https://vy.example") == "wss://vy.example/api/v1/ws/training"


def test_folder_upload_is_zipped_streamed_and_rejection_reason_reported(tmp_path: Path) -> None:
    folder = tmp_path / "cats"
    (folder / "train" / "cat").mkdir(parents=True)
    (folder / "train" / "cat" / "a.png").write_bytes(b"not really a png")
    received: dict[str, Any] = {}
    polls = iter(["processing", "processing", "rejected"])

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/v1/datasets":
            received["create"] = json.loads(request.content)
            return httpx.Response(201, json={"status": "created", "dataset_id": "ds1", "dataset": {"id": "ds1"}})
        if request.url.path == "/api/v1/datasets/ds1/upload":
            received["content_type"] = request.headers["content-type"]
            received["body"] = request.read()
            return httpx.Response(202, json={"status": "processing", "dataset_id": "ds1"})
        status = next(polls)
        return httpx.Response(200, json={"id": "ds1", "status": status,
                                         "rejection_reason": "train/cat/a.png: not a decodable image"
                                         if status == "rejected" else None})

    with ApiClient("http://api.test", transport=httpx.MockTransport(answer)) as client:
        outcome = upload_dataset(client, folder, name="cats", poll_interval=0.01)

    assert received["create"]["name"] == "cats"
    assert received["content_type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(received["body"])) as archive:
        assert archive.namelist() == ["train/cat/a.png"]
    assert not outcome.ready and outcome.status == "rejected"
    assert outcome.reason == "train/cat/a.png: not a decodable image"
    assert next(polls, None) is None  # it kept polling until the verdict
