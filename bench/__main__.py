"""`python -m bench [--quick]`: run the benchmarks and write bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from bench import event_pipeline

RESULTS = Path(__file__).with_name("RESULTS.md")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    """Run every benchmark and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (the test suite's smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="visionyard-bench-") as scratch:
        sections = [asyncio.run(event_pipeline.run(Path(scratch), quick=args.quick, runs=runs))]
    header = [
        "# Visionyard benchmark results",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}",
        f"- commit: {_commit()}",
        f"- reproduce: `make bench` (or `.venv/bin/python -m bench{' --quick' if args.quick else ''}`)",
        f"- runs per figure: {runs} (median, with min/max)",
        "",
    ]
    report = "\n".join(header + sections) + "\n"
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
