"""bench/interactive.py at a small size: the interactive benchmark runs end to end, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_interactive_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bench-interactive.json"
    ran = subprocess.run(
        [sys.executable, "-m", "bench.interactive", "--repeats", "2", "--backlog", "10", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "engine 1st seg" in ran.stdout and "backlog 1st" in ran.stdout, ran.stdout
    results = json.loads(out.read_text())
    for name in ("one sentence", "five sentences"):
        engine = results["engine"][name]
        assert 0 < engine["first_segment"]["p50_ms"] <= engine["whole"]["p50_ms"]
        for phase in ("idle", "backlog_draining"):
            streamed = results[phase][name]
            # The first byte comes after the engine's first segment and no later than the last byte.
            assert (
                engine["first_segment"]["p50_ms"] < streamed["first_byte"]["p50_ms"] <= streamed["last_byte"]["p50_ms"]
            )
