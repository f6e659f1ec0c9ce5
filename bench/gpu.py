"""IndexTTS2 speed without the weights: the real architecture, random weights, a fixed amount of work.

    python -m bench.gpu [--size auto|tiny|full] [--workers 1,2,4] [--tasks 24] [--out bench-gpu.json]

Speed depends on the architecture, the precision and how many mel tokens are generated, not on
the weights' values: ``engines/indextts2_random.py`` builds the checkpoint set (full size on a
CUDA machine, tiny elsewhere) with the GPT's stop token suppressed, so every run generates exactly
``max_mel_tokens`` codes per segment. Measured, each against a baseline of the same run:

1. the engine alone (``IndexTTS2Engine``, in this process), per precision that builds here: the
   first request after construction and the warm median, for a one-sentence and a long text, as a
   real-time factor (seconds of work per second of audio); peak GPU memory per instance (CUDA) or
   the process's peak RSS (CPU);
2. the service around it: ``indextts-api all --engine indextts2`` with 1, 2, 4 TTS worker processes
   on the one device draining a backlog, tasks per second against N engines alone (N times the
   warm one-sentence rate), and the GPU's utilisation sampled from ``nvidia-smi`` meanwhile.

Prints a table and writes JSON. The test suite runs it at tiny size on CPU, so it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.pipeline import measure_drain
from bench.stack import ROOT, service_role, webhook_receiver
from indextts_api.devtools import embedded_servers
from indextts_api.engines.base import SynthesisJob
from indextts_api.engines.indextts2 import EngineOptions, IndexTTS2Engine
from indextts_api.engines.indextts2_random import Size, generate
from indextts_api.schemas import TaskParams

ONE_SENTENCE = "Hello, this is a test of text-to-speech generation."
# About 30 seconds of speech when read: segments of at most 120 text tokens each.
LONG_TEXT = " ".join(
    [
        "The quick brown fox jumps over the lazy dog near the quiet river bank, while the morning sun rises.",
        "Every voice product needs speech that is fast, natural and clear, whatever the length of the text.",
        "This paragraph is long enough to be split into several segments, each generated on its own.",
        "The benchmark measures how long the engine takes for each second of audio it produces.",
    ]
    * 2
)


@dataclass(frozen=True)
class Workload:
    """Mel codes per segment (the GPT's stop token is suppressed: it always generates this many)."""

    one_sentence_tokens: int
    long_text_tokens: int
    backlog_tokens: int


# Full size: ~50 mel codes per second of audio, so 150 codes ~ a 3 s sentence, 400 per segment of
# the long text ~ 30 s in all. Tiny: a few codes, to keep the CPU run short.
WORKLOADS = {"full": Workload(150, 400, 150), "tiny": Workload(12, 16, 12)}


@dataclass
class EngineFigures:
    precision: str
    construct_s: float
    first_s: float  # the first request after construction (one sentence)
    one_sentence_s: float  # warm median
    one_sentence_audio_s: float
    long_text_s: float
    long_text_audio_s: float
    peak_memory_mib: float

    @property
    def one_sentence_rtf(self) -> float:
        return self.one_sentence_s / self.one_sentence_audio_s

    @property
    def long_text_rtf(self) -> float:
        return self.long_text_s / self.long_text_audio_s


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def precisions(cuda: bool) -> dict[str, dict[str, bool]]:
    """The engine options to measure: fp16 and the BigVGAN CUDA kernel exist on CUDA only."""
    if not cuda:
        return {"fp32": {}}
    return {"fp32": {}, "fp16": {"use_fp16": True}, "fp16+cuda_kernel": {"use_fp16": True, "use_cuda_kernel": True}}


def _synthesize(engine: IndexTTS2Engine, text: str, prompt: Path, out: Path, tokens: int) -> tuple[float, float]:
    """(seconds of work, seconds of audio) of one synthesis."""
    job = SynthesisJob("bench", text, prompt, None, TaskParams(emo_control_method=0, max_mel_tokens=tokens))
    started = time.perf_counter()
    outcome = engine.synthesize(job, out)
    return time.perf_counter() - started, outcome.audio_seconds


def _peak_memory_mib(cuda: bool) -> float:
    if cuda:
        import torch

        return float(torch.cuda.max_memory_allocated()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_engine(
    model_dir: Path, cache_dir: Path, precision: str, options: dict[str, bool], workload: Workload, repeats: int
) -> EngineFigures:
    cuda = cuda_available()
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine = IndexTTS2Engine(
        EngineOptions(
            model_dir,
            cache_dir,
            language="en",
            warmup=False,
            use_fp16=options.get("use_fp16", False),
            use_cuda_kernel=options.get("use_cuda_kernel", False),
        )
    )
    construct_s = time.perf_counter() - started
    prompt = ROOT / "prompts" / "example.wav"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.wav"
        first_s, _ = _synthesize(engine, ONE_SENTENCE, prompt, out, workload.one_sentence_tokens)
        short = [_synthesize(engine, ONE_SENTENCE, prompt, out, workload.one_sentence_tokens) for _ in range(repeats)]
        long = [
            _synthesize(engine, LONG_TEXT, prompt, out, workload.long_text_tokens) for _ in range(max(1, repeats // 2))
        ]
    figures = EngineFigures(
        precision=precision,
        construct_s=construct_s,
        first_s=first_s,
        one_sentence_s=statistics.median(s for s, _ in short),
        one_sentence_audio_s=short[0][1],
        long_text_s=statistics.median(s for s, _ in long),
        long_text_audio_s=long[0][1],
        peak_memory_mib=_peak_memory_mib(cuda),
    )
    engine.close()
    del engine
    return figures


class GpuSampler:
    """GPU utilisation (%) sampled from nvidia-smi every 200 ms while in use; none without it."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            argv = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def measure_service(
    model_dir: Path,
    hub_cache: Path,
    cache_dir: Path,
    workers: int,
    tasks: int,
    workload: Workload,
    device: str,
    work_dir: Path,
) -> dict[str, Any]:
    """``all --engine indextts2 --tts-workers N`` draining ``tasks`` one-sentence tasks."""
    texts = [f"{ONE_SENTENCE} Task {index}." for index in range(tasks)]
    env = {
        "MODEL_DIR": str(model_dir),
        "ENGINE_CACHE_DIR": str(cache_dir),
        "ENGINE_LANGUAGE": "en",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "DEVICE": device,
    }
    with contextlib.ExitStack() as stack:
        infra = stack.enter_context(embedded_servers(work_dir / f"infra-{workers}"))
        receiver = stack.enter_context(webhook_receiver())
        service = stack.enter_context(
            service_role(
                work_dir,
                infra,
                "all",
                f"service-{workers}",
                "--engine",
                "indextts2",
                "--tts-workers",
                str(workers),
                **env,
            )
        )
        _wait_for_workers(service.base_url, workers)
        with GpuSampler() as gpu:
            drain = measure_drain(
                service, receiver, texts, params={"emo_control_method": 0, "max_mel_tokens": workload.backlog_tokens}
            )
    return {"workers": workers, **asdict(drain), "gpu_utilisation_pct": gpu.mean}


def _wait_for_workers(base_url: str, workers: int, timeout_s: float = 600) -> None:
    """Until /health counts ``workers`` TTS workers (each has loaded and warmed up its engine)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            detail = httpx.get(f"{base_url}/health", timeout=5).json()["checks"]["engine"]["detail"] or ""
            if detail.startswith(f"{workers} TTS worker"):
                return
        time.sleep(1)
    raise TimeoutError(f"{workers} TTS workers did not report within {timeout_s:.0f} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = cuda_available()
    size: Size = "full" if cuda else "tiny"
    if args.size != "auto":
        size = "full" if args.size == "full" else "tiny"
    workload = WORKLOADS[size]
    with contextlib.ExitStack() as stack:
        work_dir = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model_dir, hub_cache, cache_dir = work_dir / "checkpoints", work_dir / "hub", work_dir / "engine-cache"
        os.environ["HF_HUB_CACHE"] = str(hub_cache)  # read by huggingface_hub when the engine loads
        os.environ["HF_HUB_OFFLINE"] = "1"
        started = time.perf_counter()
        if not (model_dir / "config.yaml").exists():
            generate(model_dir, hub_cache, size)
        generated_s = time.perf_counter() - started
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reaching max_mel_tokens warns: it is what is asked for
            engines = [
                measure_engine(model_dir, cache_dir, name, options, workload, args.repeats)
                for name, options in precisions(cuda).items()
            ]
        device = "cuda" if cuda else "cpu"
        services = [
            measure_service(model_dir, hub_cache, cache_dir, workers, args.tasks, workload, device, work_dir)
            for workers in args.workers
        ]
    fp32 = engines[0]
    for service in services:
        # N engines alone, each at the warm one-sentence speed of the one measured.
        alone = service["workers"] / fp32.one_sentence_s
        service["engines_alone_tasks_per_s"] = alone
        service["efficiency"] = service["tasks_per_s"] / alone
    return {
        "date": time.strftime("%Y-%m-%d"),
        "size": size,
        "device": _device_name(cuda),
        "generated_s": generated_s,
        "workload": asdict(workload),
        "engine": [
            {**asdict(e), "one_sentence_rtf": e.one_sentence_rtf, "long_text_rtf": e.long_text_rtf} for e in engines
        ],
        "service": services,
    }


def _device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return str(torch.cuda.get_device_name(0))
    return f"CPU ({os.cpu_count()} cores)"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"IndexTTS2 {results['size']} random weights on {results['device']}, {results['date']}",
        "",
        "engine alone       construct  first req  1 sentence (RTF)   long text (RTF)    peak MiB",
    ]
    for e in results["engine"]:
        lines.append(
            f"  {e['precision']:<17}{e['construct_s']:>7.1f} s {e['first_s']:>8.2f} s"
            f"  {e['one_sentence_s']:>6.2f} s ({e['one_sentence_rtf']:.3f})"
            f"  {e['long_text_s']:>6.2f} s ({e['long_text_rtf']:.3f})  {e['peak_memory_mib']:>8.0f}"
        )
    lines += ["", "service drain      tasks/s   N engines alone   efficiency   GPU util"]
    for s in results["service"]:
        util = f"{s['gpu_utilisation_pct']:.0f}%" if s["gpu_utilisation_pct"] is not None else "n/a"
        lines.append(
            f"  {s['workers']} TTS worker(s) {s['tasks_per_s']:>8.3f} {s['engines_alone_tasks_per_s']:>12.3f}"
            f" {s['efficiency']:>14.0%} {util:>10}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("auto", "tiny", "full"), default="auto")
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 4])
    parser.add_argument("--tasks", type=int, default=24, help="backlog drained per service deployment")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per engine measurement")
    parser.add_argument("--work-dir", default=None, help="keep the generated checkpoints here (default: a temp dir)")
    parser.add_argument("--out", default="bench-gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = run(args)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
