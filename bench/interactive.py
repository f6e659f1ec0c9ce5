"""Interactive speech: time to the first audio byte and to the last, through POST /v1/audio/speech.

    python -m bench.interactive [--repeats 20] [--backlog 100] [--out bench-interactive.json]

One `indextts-api all` (Piper, 1 TTS worker) on the embedded Tansu and SeaweedFS. For a
one-sentence and a five-sentence input it measures, one request at a time, p50/p95 of the time to
the first byte and to the last byte of the streamed audio (pcm: no encoder delay), first with the
service idle, then while a backlog of batch tasks drains. The engine alone, in this process with
the same voice, gives the baseline of the same run: its time to its first segment and to its end.
Target (the issue's): first audio within the engine's first-segment time + 50 ms (p50), unchanged
by the backlog.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.stack import ROOT, service_role, webhook_receiver
from indextts_api.config import Settings
from indextts_api.devtools import embedded_servers
from indextts_api.engines.base import SynthesisJob
from indextts_api.engines.piper import PiperEngine
from indextts_api.schemas import TaskParams

ONE_SENTENCE = "Hello, this is a test of text-to-speech generation."
FIVE_SENTENCES = (
    "The first sentence is short. The second one follows it. A third sentence comes next. "
    "Then there is a fourth. And the fifth sentence ends it."
)
INPUTS = {"one sentence": ONE_SENTENCE, "five sentences": FIVE_SENTENCES}
API_KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * statistics.median(values), "p95_ms": 1000 * percentile(values, 95)}


def engine_alone(text: str, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """The engine's own time to its first segment and to its end, in this process."""
    engine = PiperEngine(threads=threads)
    first: list[float] = []
    total: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "out.wav"
        job = SynthesisJob("bench", text, ROOT / "prompts" / "example.wav", None, TaskParams())
        engine.synthesize(job, output)  # warm
        for _ in range(repeats):
            seen: list[float] = []

            def stamp(_audio: object, _rate: int, seen: list[float] = seen) -> None:
                seen.append(time.perf_counter())

            started = time.perf_counter()
            engine.synthesize(job, output, stamp)
            first.append(seen[0] - started)
            total.append(time.perf_counter() - started)
    engine.close()
    return {"first_segment": summary(first), "whole": summary(total)}


def stream_once(client: httpx.Client, text: str) -> tuple[float, float]:
    """Seconds to the first and to the last byte of one streamed request."""
    body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        for _chunk in response.iter_bytes():
            first = first or time.perf_counter()
    assert first is not None
    return first - started, time.perf_counter() - started


def measure_streams(client: httpx.Client, text: str, repeats: int) -> dict[str, dict[str, float]]:
    stream_once(client, text)  # warm: connection, encoder import
    firsts, lasts = zip(*(stream_once(client, text) for _ in range(repeats)), strict=True)
    return {"first_byte": summary(list(firsts)), "last_byte": summary(list(lasts))}


def queue_backlog(client: httpx.Client, hook_url: str, tasks: int) -> None:
    for index in range(tasks):
        body = {"spk_audio_prompt": "example.wav", "text": f"{ONE_SENTENCE} Number {index}.", "hook_url": hook_url}
        client.post("/generate", json=body).raise_for_status()


def run(repeats: int, backlog: int, work_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"repeats": repeats, "backlog": backlog, "date": time.strftime("%Y-%m-%d")}
    # The threads the service's one TTS worker gives its engine.
    threads: int = Settings(_env_file=None).piper_threads_per_engine  # type: ignore[call-arg]
    results["engine"] = {name: engine_alone(text, repeats, threads) for name, text in INPUTS.items()}
    with (
        embedded_servers(work_dir / "infra") as infra,
        webhook_receiver() as receiver,
        service_role(work_dir, infra, "all", "service", API_KEYS=API_KEY) as service,
    ):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=service.base_url, headers=headers, timeout=120) as client:
            results["idle"] = {name: measure_streams(client, text, repeats) for name, text in INPUTS.items()}
            with httpx.Client(base_url=service.base_url, auth=service.auth, timeout=60) as batch:
                loaded: dict[str, Any] = {}
                for name, text in INPUTS.items():
                    queue_backlog(batch, receiver.url("/backlog"), backlog)
                    loaded[name] = measure_streams(client, text, repeats)
                results["backlog_draining"] = loaded
    for name in INPUTS:
        target = results["engine"][name]["first_segment"]["p50_ms"] + 50
        results.setdefault("target_first_byte_ms", {})[name] = target
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"\ninteractive speech, {results['repeats']} requests each; backlog of {results['backlog']} batch tasks")
    columns = (
        ("engine 1st seg", 15),
        ("idle 1st byte", 14),
        ("idle last", 10),
        ("backlog 1st", 12),
        ("backlog last", 13),
    )
    print(f"{'input':16}" + "".join(f" {title:>{width}}" for title, width in columns))
    for name in INPUTS:
        engine = results["engine"][name]["first_segment"]
        idle, loaded = results["idle"][name], results["backlog_draining"][name]
        print(
            f"{name:16} {engine['p50_ms']:7.0f}/{engine['p95_ms']:<7.0f}"
            f"{idle['first_byte']['p50_ms']:7.0f}/{idle['first_byte']['p95_ms']:<6.0f}"
            f"{idle['last_byte']['p50_ms']:5.0f}/{idle['last_byte']['p95_ms']:<5.0f}"
            f"{loaded['first_byte']['p50_ms']:7.0f}/{loaded['first_byte']['p95_ms']:<5.0f}"
            f"{loaded['last_byte']['p50_ms']:7.0f}/{loaded['last_byte']['p95_ms']:<5.0f}"
        )
    print("(p50/p95 in ms; target: first byte p50 <= engine first segment p50 + 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-interactive.json"))
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-interactive-") as scratch:
        results = run(args.repeats, args.backlog, args.work_dir or Path(scratch))
    print_table(results)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
