"""The benchmark suite keeps running: a quick pass must produce a report with its ratio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_quick_bench_writes_a_report_with_ratios(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(report)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    text = report.read_text()
    assert "Ratio (bus ÷ raw)" in text
    assert "| Visionyard bus |" in text
