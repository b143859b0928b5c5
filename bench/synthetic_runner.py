"""The trainer runner with the synthetic trainer registered beside the installed ones (benchmarks only)."""

from __future__ import annotations

import asyncio
import signal

from visionyard.runner.config import RunnerSettings
from visionyard.runner.main import serve
from visionyard.shared.logs import configure_logging
from visionyard.shared.manifest import ModelInfo, TrainerManifest, installed_manifests

SYNTHETIC = TrainerManifest(
    name="synthetic", framework="synthetic", version="0", module="bench.synthetic_trainer",
    task_types=["image_classification"],
    models=[ModelInfo(model_name="synthetic", display_name="synthetic", task_types=["image_classification"])],
    dataset_formats=["imagefolder"], primary_metric={"image_classification": "loss"},
)


async def _main(settings: RunnerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop=stop, manifests=[*installed_manifests(), SYNTHETIC])


def main() -> None:
    """Run one runner until SIGTERM."""
    settings = RunnerSettings()
    configure_logging("trainer-runner", settings.log_level)
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
