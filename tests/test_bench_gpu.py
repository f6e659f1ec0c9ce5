"""bench/gpu.py at tiny size on CPU: the GPU benchmark runs end to end, so it cannot rot.

On a CUDA machine the same command builds the full-size architecture and measures fp16 too; here
it proves the pipeline of the benchmark (checkpoints, engine alone, the service draining a
backlog, the table and the JSON), not any speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

BENCH_TIMEOUT_S = 600


def test_gpu_bench_runs_at_tiny_size_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bench-gpu.json"
    argv = [sys.executable, "-m", "bench.gpu", "--size", "tiny", "--workers", "1", "--tasks", "3", "--repeats", "1"]
    ran = subprocess.run(
        [*argv, "--out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "engine alone" in ran.stdout and "service drain" in ran.stdout, ran.stdout
    results = json.loads(out.read_text())
    assert results["size"] == "tiny" and results["device"].startswith("CPU")
    [fp32] = results["engine"]  # fp16 and the CUDA kernel are measured on CUDA only
    assert fp32["precision"] == "fp32"
    assert fp32["one_sentence_audio_s"] > 0 and fp32["one_sentence_rtf"] > 0 and fp32["long_text_rtf"] > 0
    # The long text is several segments, each generating the same fixed number of mel codes.
    assert fp32["long_text_audio_s"] > fp32["one_sentence_audio_s"]
    [service] = results["service"]
    assert service["workers"] == 1 and service["tasks"] == 3
    assert service["tasks_per_s"] > 0 and service["efficiency"] > 0
    assert service["gpu_utilisation_pct"] is None  # no nvidia-smi here
