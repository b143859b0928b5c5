"""`python -m bench [--quick] [--only NAME ...] [--output PATH]`: run the benchmarks, write bench/RESULTS.md.

Every figure is its own module with `run(scratch, *, quick, runs)` returning a markdown section; each
starts what it needs (nats-server, the embedded stack, an MLflow store, moto_server) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import (
    artifacts,
    dispatch,
    event_pipeline,
    live_latency,
    scale,
    scheduling,
    tracker,
    training_overhead,
    yolo_overhead,
)

RESULTS = Path(__file__).with_name("RESULTS.md")
FIGURES = {
    "training_overhead": training_overhead,
    "event_pipeline": event_pipeline,
    "tracker": tracker,
    "live_latency": live_latency,
    "dispatch": dispatch,
    "artifacts": artifacts,
    "scale": scale,
    "scheduling": scheduling,
    "yolo_overhead": yolo_overhead,
}


def _commit(output: Path) -> str:
    # The report it is about to overwrite does not count as a change to what was measured.
    # A report written outside the checkout is no pathspec git takes (it said "unknown" for every such run).
    root = Path(__file__).resolve().parents[1]
    excluded = [f":(exclude){output.resolve()}"] if output.resolve().is_relative_to(root) else []
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *excluded],
                               capture_output=True, text=True, check=True, cwd=root)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class LoadSampler:
    """The 1-minute load average every `every` seconds while the figures run: other work on the machine
    moves every figure, so the report says how busy it was."""

    def __init__(self, every: float = 20.0) -> None:
        self.samples: list[float] = []
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        if not self.samples:
            return "not sampled (shorter than one interval)"
        return (f"median {statistics.median(self.samples):.1f}, max {max(self.samples):.1f} on "
                f"{os.cpu_count()} cores ({len(self.samples)} samples; the stack itself loads the cores)")


def main() -> None:
    """Run the chosen benchmarks and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (the test suite's smoke run)")
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), help="run only these figures")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, or 1 with --quick)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    # Services and trainers import `bench.*`; make that work from any working directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                             os.environ.get("PYTHONPATH")]))
    chosen = args.only or list(FIGURES)
    sections = []
    timings = []
    with tempfile.TemporaryDirectory(prefix="visionyard-bench-") as scratch, LoadSampler() as load:
        for name in chosen:
            started = time.perf_counter()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            figure_dir = Path(scratch) / name
            figure_dir.mkdir()
            sections.append(asyncio.run(FIGURES[name].run(figure_dir, quick=args.quick, runs=runs)))
            timings.append(f"{name} {time.perf_counter() - started:.0f} s")
    header = [
        "# Visionyard benchmark results",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- commit: {_commit(args.output)}",
        f"- reproduce: `make bench` (or `.venv/bin/python -m bench{' --quick' if args.quick else ''}"
        f"{' --only ' + ' '.join(chosen) if args.only else ''}`)",
        f"- runs per figure: {runs}; figures are the median with (min–max) unless stated",
        f"- wall time per figure: {', '.join(timings)}",
        f"- machine load during the run (1-min load average, sampled every 20 s): {load.summary()}",
        "- how the figures were profiled and what changed because of it: `bench/PROFILE.md`",
        "",
    ]
    report = "\n".join(header + sections) + "\n"
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
