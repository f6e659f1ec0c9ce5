"""Task figures through the whole pipeline, against the engine's own figures from the same run.

- overhead: one task at a time, submit → webhook arrival, minus the engine's own synthesis time of
  the same text (measured in this process, same engine, same voice);
- efficiency: a backlog of short tasks, drain rate over the engine's raw rate on the same texts;
- memory: resident set size of every process of the service and of the embedded servers.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.stack import ROOT, Role
from indextts_api.devtools import WebhookReceiver, child_processes
from indextts_api.engines.base import SynthesisJob
from indextts_api.engines.piper import PiperEngine
from indextts_api.schemas import TaskParams

ONE_SENTENCE = "Hello, this is a test of text-to-speech generation."


def short_texts(count: int) -> list[str]:
    """Distinct short sentences (a second or two of speech each), the shape of a busy voice product."""
    subjects = ["Your order", "The meeting", "Flight two", "The package", "Your table", "The report", "Room nine"]
    states = ["is ready", "starts soon", "was moved", "has shipped", "is confirmed", "needs review", "is open"]
    return [f"{subjects[i % 7]} {states[(i // 7) % 7]}, reference {i}." for i in range(count)]


@dataclass
class EngineBaseline:
    seconds_per_text: dict[str, float]  # median engine time per distinct text

    engines: int = 1  # engines side by side, each as fast as the one measured

    def rate(self, texts: list[str]) -> float:
        """Tasks per second the bare engine(s) manage on ``texts``."""
        return self.engines * len(texts) / sum(self.seconds_per_text[text] for text in texts)

    def times(self, engines: int) -> EngineBaseline:
        return EngineBaseline(self.seconds_per_text, engines)

    @staticmethod
    def around(before: EngineBaseline, after: EngineBaseline) -> EngineBaseline:
        """The engine measured just before and just after a service ran: the mean time per text,
        so a machine that got faster or slower meanwhile moves both sides of the ratio alike."""
        return EngineBaseline(
            {text: (seconds + after.seconds_per_text[text]) / 2 for text, seconds in before.seconds_per_text.items()},
            before.engines,
        )


class BareEngine:
    """The engine alone, in this process: the figure every pipeline figure is compared with."""

    def __init__(self, threads: int) -> None:
        self._engine = PiperEngine(threads=threads)
        self._scratch = tempfile.TemporaryDirectory()
        self.seconds(ONE_SENTENCE)  # the first call pays for lazy initialisation

    def seconds(self, text: str) -> float:
        job = SynthesisJob("baseline", text, ROOT / "prompts" / "example.wav", None, TaskParams())
        started = time.perf_counter()
        self._engine.synthesize(job, Path(self._scratch.name) / "out.wav")
        return time.perf_counter() - started

    def close(self) -> None:
        self._engine.close()
        self._scratch.cleanup()


def measure_engine(engine: BareEngine, texts: list[str], repeats: int) -> EngineBaseline:
    timings: dict[str, list[float]] = {text: [] for text in texts}
    for _ in range(repeats):
        for text in texts:
            timings[text].append(engine.seconds(text))
    return EngineBaseline({text: statistics.median(values) for text, values in timings.items()})


def submit(client: httpx.Client, text: str, hook_url: str, params: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"spk_audio_prompt": "example.wav", "text": text, "hook_url": hook_url}
    if params:
        body["params"] = params
    answer = client.post("/generate", json=body)
    answer.raise_for_status()
    task_uuid: str = answer.json()["task_uuid"]
    return task_uuid


@dataclass
class OverheadFigures:
    tasks: int
    end_to_end_p50_ms: float
    engine_ms: float  # the bare engine on the same text, between the tasks, median
    overhead_p50_ms: float
    overhead_p95_ms: float
    worker_synthesis_p50_ms: float  # what the TTS worker reported for the same tasks


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure_overhead(role: Role, receiver: WebhookReceiver, engine: BareEngine, tasks: int) -> OverheadFigures:
    """Each task's end-to-end time minus the bare engine's time on the same text, measured right
    after it (while the service is idle): the pair sees the same machine, whatever it does
    meanwhile, so a slow or fast minute does not land on one side only."""
    end_to_end: list[float] = []
    engine_alone: list[float] = []
    worker_synthesis: list[float] = []
    with httpx.Client(base_url=role.base_url, auth=role.auth, timeout=30) as client:
        for index in range(tasks + 2):  # the first two warm the worker's connections and caches
            submitted = time.time()
            task_uuid = submit(client, ONE_SENTENCE, receiver.url("/overhead"))
            hook = receiver.wait_for(task_uuid, timeout_s=60)[0]
            if hook.payload["status"] != "success":
                raise RuntimeError(f"task failed: {hook.payload}")
            if index < 2:
                continue
            end_to_end.append(hook.received_at - submitted)
            status = client.get(f"/tasks/{task_uuid}").json()
            worker_synthesis.append(status["timings"]["synthesis_s"])
            time.sleep(0.05)  # one task at a time, as a lone client sees the service
            engine_alone.append(engine.seconds(ONE_SENTENCE))
    overheads = [total - bare for total, bare in zip(end_to_end, engine_alone, strict=True)]
    return OverheadFigures(
        tasks=tasks,
        end_to_end_p50_ms=1000 * statistics.median(end_to_end),
        engine_ms=1000 * statistics.median(engine_alone),
        overhead_p50_ms=1000 * percentile(overheads, 0.5),
        overhead_p95_ms=1000 * percentile(overheads, 0.95),
        worker_synthesis_p50_ms=1000 * statistics.median(worker_synthesis),
    )


@dataclass
class DrainFigures:
    tasks: int
    seconds: float
    tasks_per_s: float

    def efficiency(self, engine: EngineBaseline, texts: list[str]) -> float:
        """Drain rate over the engine's raw rate on the same texts."""
        return self.tasks_per_s / engine.rate(texts)


def measure_drain(
    role: Role, receiver: WebhookReceiver, texts: list[str], params: dict[str, Any] | None = None
) -> DrainFigures:
    """Submit ``texts`` (with ``params``) as fast as the API takes them, then wait for every webhook."""
    path = f"/drain-{time.time_ns()}"
    with httpx.Client(base_url=role.base_url, auth=role.auth, timeout=30) as client:
        started = time.time()
        with ThreadPoolExecutor(max_workers=8) as pool:
            task_uuids = list(pool.map(lambda text: submit(client, text, receiver.url(path), params), texts))
        arrivals = []
        for task_uuid in task_uuids:
            hook = receiver.wait_for(task_uuid, timeout_s=300)[0]
            if hook.payload["status"] != "success":
                raise RuntimeError(f"task failed: {hook.payload}")
            arrivals.append(hook.received_at)
    seconds = max(arrivals) - started
    return DrainFigures(len(texts), seconds, len(texts) / seconds)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _role_name(argv: list[bytes]) -> str:
    for name in (b"tts-worker", b"upload-worker"):
        if name in argv:
            return name.decode()
    return Path(argv[0].decode()).name


def service_processes(pids: dict[str, int]) -> dict[str, int]:
    """The given processes (the service's main process under "api") and the service's workers by role."""
    expanded = dict(pids)
    for pid, argv in child_processes(pids["api"]).items():
        name = _role_name(argv)
        suffix = sum(1 for key in expanded if key.startswith(name))
        expanded[f"{name}-{suffix}"] = pid
    return expanded


def resident_memory(processes: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Name → (RSS now, peak RSS) in MiB."""
    return {
        name: (_status_kib(pid, "VmRSS") / 1024, _status_kib(pid, "VmHWM") / 1024) for name, pid in processes.items()
    }


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(processes: dict[str, int]) -> dict[str, float]:
    """Name → CPU seconds (user + system) the process has used so far."""
    used = {}
    for name, pid in processes.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return used
