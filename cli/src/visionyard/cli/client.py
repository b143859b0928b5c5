"""A thin REST client for the Visionyard API (API.md), with errors a person can act on.

Every non-2xx answer becomes an `ApiError` carrying the API's own `detail`, so the CLI can print
what the server said instead of a stack trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

API_PREFIX = "/api/v1"


class ApiError(RuntimeError):
    """The API answered with an error status; `detail` is its explanation."""

    def __init__(self, *, method: str, url: str, status_code: int, detail: Any) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{method} {url} failed with {status_code}: {format_detail(detail)}")


class ApiUnreachable(RuntimeError):
    """Nothing answered at the API URL (stack not running, wrong port)."""


def format_detail(detail: Any) -> str:
    """Render FastAPI's `detail` (a string or a list of validation errors) on one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                location = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict | list):
        return json.dumps(detail)
    return str(detail)


def websocket_url(api_url: str) -> str:
    """The training WebSocket endpoint of the API at `api_url`."""
    base = api_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return f"{base}{API_PREFIX}/ws/training"


class ApiClient:
    """Synchronous calls to one API instance."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, token: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; the decoded JSON body, or `ApiError`/`ApiUnreachable`."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiUnreachable(
                f"cannot reach the Visionyard API at {self.base_url} ({error.__class__.__name__}: {error}); "
                "is `visionyard up` running, and is --api right?"
            ) from error
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text or response.reason_phrase
            raise ApiError(method=method, url=f"{self.base_url}{path}", status_code=response.status_code,
                           detail=detail)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def is_ready(self) -> bool:
        """Whether GET /health/ready answers 200 (broker and DB reachable)."""
        try:
            return self._http.get("/health/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    # Datasets
    def create_dataset(self, *, name: str, description: str | None = None, visibility: str = "private") -> str:
        """Create a dataset record; its id."""
        body = self.request("POST", f"{API_PREFIX}/datasets",
                            json={"name": name, "description": description, "visibility": visibility})
        dataset_id = body.get("dataset_id") or (body.get("dataset") or {}).get("id")
        if not dataset_id:
            raise RuntimeError(f"the API created a dataset but returned no id: {body}")
        return str(dataset_id)

    def upload_dataset_zip(self, dataset_id: str, zip_path: Path) -> Any:
        """Upload a zip as a raw `application/zip` body; httpx streams the open file in chunks."""
        with zip_path.open("rb") as handle:
            return self.request(
                "POST",
                f"{API_PREFIX}/datasets/{dataset_id}/upload",
                content=handle,
                headers={"Content-Type": "application/zip", "X-Filename": zip_path.name},
                timeout=httpx.Timeout(30.0, write=None, read=300.0),
            )

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """GET /datasets/{id}."""
        return dict(self.request("GET", f"{API_PREFIX}/datasets/{dataset_id}"))

    # Training
    def create_job(self, *, config: dict[str, Any], experiment_name: str | None = None,
                   priority: str | int | None = None) -> dict[str, Any]:
        """POST /training/jobs; the job (status pending)."""
        body: dict[str, Any] = {"config": config}
        if experiment_name:
            body["experiment_name"] = experiment_name
        if priority is not None:
            body["priority"] = priority
        return dict(self.request("POST", f"{API_PREFIX}/training/jobs", json=body))

    def start_job(self, job_id: str) -> dict[str, Any]:
        """POST /training/jobs/{id}/start; the job (status queued)."""
        return dict(self.request("POST", f"{API_PREFIX}/training/jobs/{job_id}/start"))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """GET /training/jobs/{id}."""
        return dict(self.request("GET", f"{API_PREFIX}/training/jobs/{job_id}"))

    def get_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """GET /training/jobs/{id}/checkpoints."""
        body = self.request("GET", f"{API_PREFIX}/training/jobs/{job_id}/checkpoints")
        return list(body.get("checkpoints", []))

    def get_mlflow_summary(self, job_id: str) -> dict[str, Any]:
        """GET /training/jobs/{id}/mlflow/summary."""
        return dict(self.request("GET", f"{API_PREFIX}/training/jobs/{job_id}/mlflow/summary"))
