"""The benchmark suite keeps running: a quick pass of every figure must produce a report with its numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each figure's headline and the pattern of the number it must report.
HEADLINES = {
    "training_overhead": r"Ratio \(platform ÷ standalone\): \*\*([0-9.]+)\*\*",
    "event_pipeline": r"Ratio \(pipeline ÷ raw\): \*\*([0-9.]+)\*\*",
    "tracker": r"Ratio \(tracker ÷ log_batch\): \*\*([0-9.]+)\*\*",
    "live_latency": r"\| platform \| 10 \| 200 \| 4,000 \| ([0-9.,]+) \|",
    "dispatch": r"p50 per series, median \(min–max\) \| ([0-9.,]+) ",
    "artifacts": r"Ratio \(direct ÷ platform time\): \*\*([0-9.]+)\*\*",
    "scale": r"jobs dispatched per second \(runner spawned the trainer\) \| ([0-9.,]+) ",
    "scheduling": r"(?s)## Scheduling.*?jobs dispatched per second \(runner spawned the trainer\) \| ([0-9.,]+) ",
    "yolo_overhead": r"Ratio \(YOLO platform ÷ standalone\): \*\*([0-9.]+)\*\*",
}


@pytest.mark.e2e
def test_quick_bench_reports_every_figure_with_a_positive_number(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert "- commit: " in text and "- machine: " in text
    for figure, pattern in HEADLINES.items():
        found = re.search(pattern, text)
        assert found, f"{figure}: no figure matching {pattern!r} in the report"
        assert float(found.group(1).replace(",", "")) > 0, f"{figure}: {found.group(0)}"
