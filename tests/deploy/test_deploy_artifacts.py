"""The deploy artifacts, checked without Docker or a cluster: compose.yaml against the Compose specification's
schema (vendored by check-jsonschema), every Kubernetes manifest against the Kubernetes schemas (bundled by
kubernetes-validate), the KEDA ScaledObject against a focused schema of its documented fields, and the
configuration each file gives a service against that service's own production refusals."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from visionyard.api.config import ApiSettings
from visionyard.runner.config import RunnerSettings
from visionyard.shared import streams
from visionyard.storage.config import StorageSettings
from visionyard.tracker.config import TrackerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "compose.yaml"
KEDA_SCHEMA = Path(__file__).with_name("keda-scaledobject.schema.json")
# The newest Kubernetes whose schemas kubernetes-validate bundles (requirements-dev.txt pins it).
KUBERNETES_VERSION = "1.37.0"
SETTINGS: dict[str, type[BaseSettings]] = {
    "visionyard-api": ApiSettings, "visionyard-runner": RunnerSettings,
    "visionyard-tracker": TrackerSettings, "visionyard-storage": StorageSettings,
}
NOT_KUBERNETES = {"kustomization.yaml", "keda-runner.yaml"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in sorted(DEPLOY.glob("*.yaml")) if path.name not in NOT_KUBERNETES for doc in _documents(path)]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _id, doc in _manifests() if doc["kind"] == kind}


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


# -- compose -------------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    checked = _check_compose(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The same check refuses a misspelt key, so it is not passing everything.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    command: [\"visionyard-api\"]", "    comand: [\"visionyard-api\"]"))
    refused = _check_compose(broken)
    assert refused.returncode != 0 and "comand" in refused.stdout + refused.stderr


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    # Compose interpolates ${VAR} / ${VAR:?message} from the operator's environment.
    return {key: re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "compose-secret", str(value))
            for key, value in (service.get("environment") or {}).items()}


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_compose_gives_each_service_a_configuration_its_production_mode_accepts(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    services = [s for s in yaml.safe_load(COMPOSE.read_text())["services"].values() if s.get("command") == [command]]
    assert len(services) == 1, f"compose runs {command} once (scaled with --scale)"
    environment = _compose_environment(services[0])
    _assert_production_settings(SETTINGS[command], environment, monkeypatch, tmp_path)


# -- Kubernetes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [doc for _id, doc in _manifests()], ids=[i for i, _doc in _manifests()])
def test_kubernetes_manifest_follows_the_kubernetes_schema(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_check_refuses_a_broken_deployment() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment")["runner"])
    deployment["spec"]["replica"] = 2  # misspelt: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(_by_kind("Deployment")["runner"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] = "lots"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secrets_example() -> None:
    resources = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    on_disk = {path.name for path in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert resources == on_disk


def _deployment_environment(deployment: dict[str, Any]) -> dict[str, str]:
    """The environment a Deployment's container gets: its secret (the example's), then its env entries."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secrets = _by_kind("Secret")
    config_maps = _by_kind("ConfigMap")
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(secrets[source["secretRef"]["name"]]["stringData"])
    for entry in container.get("env", []):
        if "value" in entry:
            environment[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["configMapKeyRef"]
            environment[entry["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
    return environment


@pytest.mark.parametrize("name", sorted(_by_kind("Deployment")))
def test_each_deployment_gets_a_configuration_its_production_mode_accepts(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    deployment = _by_kind("Deployment")[name]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"][0]
    environment = _deployment_environment(deployment)
    _assert_production_settings(SETTINGS[command], environment, monkeypatch, tmp_path)


def test_only_storage_is_handed_s3_credentials() -> None:
    for name, deployment in _by_kind("Deployment").items():
        holds_s3_keys = any("S3_SECRET_ACCESS_KEY" in key for key in _deployment_environment(deployment))
        assert holds_s3_keys == (name == "storage"), name


def _assert_production_settings(
    settings_class: type[BaseSettings], environment: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    prefix = settings_class.model_config["env_prefix"]
    ours = {key: value for key, value in environment.items() if key.startswith(prefix)}
    # A variable the settings class does not know would be silently ignored (extra="ignore").
    unknown = sorted(key for key in ours if key[len(prefix):].lower() not in settings_class.model_fields)
    assert unknown == [], f"{settings_class.__name__} has no such settings: {unknown}"
    for key in [key for key in os.environ if key.startswith("VISIONYARD_")]:
        monkeypatch.delenv(key)
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(f"{prefix}DATA_DIR", str(tmp_path))
    settings = settings_class()
    assert settings.model_dump()["mode"] == "production"


# -- KEDA ----------------------------------------------------------------------------------------------


def _keda_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_keda_scales_runners_on_waiting_jobs_and_the_runner_consumers_pending_commands() -> None:
    (scaled,) = _documents(DEPLOY / "keda-runner.yaml")
    assert _keda_errors(scaled) == []
    assert scaled["spec"]["scaleTargetRef"]["name"] in _by_kind("Deployment")
    assert _by_kind("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"][
        "containers"][0]["command"] == ["visionyard-runner"]
    backlog, queue = scaled["spec"]["triggers"]
    assert backlog["type"] == "nats-jetstream"
    assert (backlog["metadata"]["stream"], backlog["metadata"]["consumer"]) == (streams.RUNNER.stream, streams.RUNNER.durable)
    # The jobs waiting for the scheduler: the API's public depth route, through the API's Service.
    assert queue["type"] == "metrics-api" and queue["metadata"]["valueLocation"] == "waiting"
    url = queue["metadata"]["url"]
    assert url.endswith("/api/v1/queues/depth") and url.startswith("http://api.visionyard.svc:8000/")
    service = _by_kind("Service")["api"]
    assert service["spec"]["selector"] == _by_kind("Deployment")["api"]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("breakage", ["typo", "threshold", "scheme", "missing"])
def test_the_keda_schema_refuses_a_broken_trigger(breakage: str) -> None:
    (scaled,) = _documents(DEPLOY / "keda-runner.yaml")
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    if breakage == "typo":
        metadata["consumerName"] = metadata.pop("consumer")
    elif breakage == "threshold":
        metadata["lagThreshold"] = 2  # KEDA's metadata values are strings
    elif breakage == "scheme":
        metadata["natsServerMonitoringEndpoint"] = "http://nats.nats.svc:8222"
    else:
        del metadata["stream"]
    assert _keda_errors(scaled) != []


@pytest.mark.parametrize("breakage", ["typo", "target", "url"])
def test_the_keda_schema_refuses_a_broken_metrics_api_trigger(breakage: str) -> None:
    (scaled,) = _documents(DEPLOY / "keda-runner.yaml")
    metadata = scaled["spec"]["triggers"][1]["metadata"]
    if breakage == "typo":
        metadata["valuePath"] = metadata.pop("valueLocation")
    elif breakage == "target":
        metadata["targetValue"] = 2  # a string in KEDA's metadata
    else:
        metadata["url"] = "api:8000/api/v1/queues/depth"
    assert _keda_errors(scaled) != []
