"""Accept rate: POST /generate under wrk (32 connections), then a count of what the broker stored."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from indextts_api import kafka
from indextts_api.config import Settings

# wrk's own Lua: every request is a full, valid /generate with Basic auth; the summary comes back
# as one JSON line so nothing depends on wrk's human-readable layout.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
wrk.body = os.getenv("BENCH_BODY")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
    .. '"status_errors": %d, "timeouts": %d, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""

TASK_BODY = {
    "spk_audio_prompt": "example.wav",
    "text": "Hello, this is a test of text-to-speech generation.",
    "hook_url": "https://hooks.example.com/webhook/tts-complete",
    "params": {"emo_control_method": 1, "emo_weight": 0.65, "temperature": 0.8, "max_text_tokens_per_segment": 120},
}


@dataclass
class AcceptFigures:
    requests_per_s: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    accepted_in_all: int  # 200s over the warm-up and the measured run
    stored: int  # messages found in the topic afterwards: every 200 must be among them


def wrk_executable() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (make bench does it)")
    return found


def run_wrk(base_url: str, auth: tuple[str, str], seconds: int, connections: int, work_dir: Path) -> dict[str, float]:
    script = work_dir / "generate.lua"
    script.write_text(WRK_SCRIPT)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    env = {**os.environ, "BENCH_AUTH": f"Basic {token}", "BENCH_BODY": json.dumps(TASK_BODY)}
    argv = [
        wrk_executable(),
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "15s",
        "-s",
        str(script),
        f"{base_url}/generate",
    ]
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    summary_line = [line for line in completed.stdout.splitlines() if line.startswith("{")][-1]
    figures: dict[str, float] = json.loads(summary_line)
    return figures


def count_stored(bootstrap_servers: str, topic: str, idle_s: float = 3.0, limit_s: float = 120.0) -> int:
    """Read the topic from the start with a new group and count its messages."""
    settings = Settings(_env_file=None, kafka_bootstrap_servers=bootstrap_servers, kafka_profile="embedded")  # type: ignore[call-arg]
    consumer = kafka.make_consumer(settings, f"bench-count-{time.time_ns()}")
    consumer.subscribe([topic])
    count = 0
    deadline = time.monotonic() + limit_s
    last_seen = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last_seen < idle_s:
            messages = consumer.consume(num_messages=1000, timeout=0.5)
            real = [m for m in messages if m.error() is None]
            if real:
                count += len(real)
                last_seen = time.monotonic()
            elif not consumer.assignment():
                last_seen = time.monotonic()  # still joining the group
    finally:
        consumer.close()
    return count


def measure_accept(
    base_url: str, auth: tuple[str, str], bootstrap_servers: str, topic: str, seconds: int, work_dir: Path
) -> AcceptFigures:
    warm_up = run_wrk(base_url, auth, 2, 32, work_dir)  # connections, caches, the producer's batches
    figures = run_wrk(base_url, auth, seconds, 32, work_dir)
    accepted = sum(int(run["requests"] - run["status_errors"]) for run in (warm_up, figures))
    stored = count_stored(bootstrap_servers, topic)
    socket_errors = int(
        figures["connect_errors"] + figures["read_errors"] + figures["write_errors"] + figures["timeouts"]
    )
    return AcceptFigures(
        requests_per_s=figures["requests"] / (figures["duration_us"] / 1e6),
        requests=int(figures["requests"]),
        non_2xx=int(figures["status_errors"]),
        socket_errors=socket_errors,
        p50_ms=figures["p50_ms"],
        p90_ms=figures["p90_ms"],
        p99_ms=figures["p99_ms"],
        max_ms=figures["max_ms"],
        accepted_in_all=accepted,
        stored=stored,
    )
