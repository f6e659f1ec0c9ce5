"""python -m bench [--accept-seconds 10] [--overhead-tasks 30] [--backlog 100]"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.accept import measure_accept
from bench.pipeline import (
    ONE_SENTENCE,
    BareEngine,
    EngineBaseline,
    cpu_seconds,
    measure_drain,
    measure_engine,
    measure_overhead,
    resident_memory,
    service_processes,
    short_texts,
)
from bench.stack import ROOT, service_role, webhook_receiver
from indextts_api.config import Settings
from indextts_api.devtools import embedded_servers
from indextts_api.workers.consumer import TENURE_MARGIN_S

# A worker's group join after the service answers /health (measured ~3 s on the embedded broker).
GROUP_JOIN_S = 5.0
ACCEPT_TOPIC = "bench_accept_tasks"  # no worker reads it: the accept run measures the API and the broker


@dataclass(frozen=True)
class Deployment:
    """One way to run the TTS workers on this host: how many, and CPU threads per engine."""

    key: str
    label: str
    tts_workers: int
    piper_threads: int  # per engine; 0 = the default (the host's cores shared among the workers)

    @property
    def threads_per_engine(self) -> int:
        """What each TTS worker of this deployment runs with (the service's own rule)."""
        settings = Settings(_env_file=None, tts_workers=self.tts_workers, piper_threads=self.piper_threads)  # type: ignore[call-arg]
        threads: int = settings.piper_threads_per_engine
        return threads


DEPLOYMENTS = [
    Deployment("default", "1 TTS worker, default threads", 1, 0),
    Deployment("one_thread", "1 TTS worker, PIPER_THREADS=1", 1, 1),
    Deployment("two_workers", "2 TTS workers, default threads", 2, 0),
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
        "cores": cores,
        "deployments": {},
    }
    backlog = short_texts(args.backlog)
    with tempfile.TemporaryDirectory(prefix="indextts-bench-") as scratch:
        work_dir = Path(scratch)
        with contextlib.ExitStack() as stack:
            infra = stack.enter_context(embedded_servers(work_dir / "infra"))
            receiver = stack.enter_context(webhook_receiver())
            engines = {threads: BareEngine(threads) for threads in sorted({d.threads_per_engine for d in DEPLOYMENTS})}
            for engine in engines.values():
                stack.callback(engine.close)
            results["engine"] = {}
            for threads, engine in engines.items():
                print(f"engine alone, {threads} thread(s): this process, same voice ...", flush=True)
                lone = measure_engine(engine, [ONE_SENTENCE], repeats=15)
                results["engine"][str(threads)] = {"one_sentence_ms": 1000 * lone.seconds_per_text[ONE_SENTENCE]}

            print(f"accept rate: wrk, 32 connections, {args.accept_seconds} s ...", flush=True)
            with service_role(work_dir, infra, "api", "api-only", KAFKA_TASK_TOPIC=ACCEPT_TOPIC) as api:
                accept = measure_accept(
                    api.base_url, api.auth, infra.kafka_bootstrap_servers, ACCEPT_TOPIC, args.accept_seconds, work_dir
                )
            results["accept"] = dataclasses.asdict(accept)

            for deployment in DEPLOYMENTS:
                print(f"service: {deployment.label} ...", flush=True)
                threads = deployment.threads_per_engine
                # The engine alone on the backlog's texts right before and right after this service
                # runs (not while it idles beside it), so both sides of the ratio see the same machine.
                engine_before = measure_engine(engines[threads], backlog, repeats=1)
                figures: dict[str, Any] = {"label": deployment.label, "threads_per_engine": threads}
                with service_role(
                    work_dir,
                    infra,
                    "all",
                    f"all-{deployment.key}",
                    "--tts-workers",
                    str(deployment.tts_workers),
                    PIPER_THREADS=str(deployment.piper_threads),
                ) as service:
                    processes = service_processes(
                        {"api": service.process.pid, **{c.name: c.pid for c in infra.children}}
                    )
                    # Steady state for every deployment: the workers have joined their group, and
                    # past its first TENURE_MARGIN_S on a partition a worker no longer treats every
                    # task as a possible redelivery (one more S3 round trip each). Without this wait
                    # the drain's clock also counted the group join (~1.8 s before the first synthesis).
                    time.sleep(TENURE_MARGIN_S + GROUP_JOIN_S)
                    if deployment.key == "default":
                        figures["overhead"] = dataclasses.asdict(
                            measure_overhead(service, receiver, engines[threads], args.overhead_tasks)
                        )
                    cpu_before = cpu_seconds(processes)
                    drain = measure_drain(service, receiver, backlog)
                    cpu_after = cpu_seconds(processes)
                    figures["processes"] = {
                        name: {
                            "rss_mib": now,
                            "peak_mib": peak,
                            "cpu_ms_per_task": 1000 * (cpu_after[name] - cpu_before[name]) / drain.tasks,
                        }
                        for name, (now, peak) in resident_memory(processes).items()
                    }
                engine_after = measure_engine(engines[threads], backlog, repeats=1)
                # An engine per worker: the raw rate of the deployment is that of its engines side by side.
                raw = EngineBaseline.around(engine_before, engine_after).times(deployment.tts_workers)
                figures["drain"] = {
                    **dataclasses.asdict(drain),
                    "engine_tasks_per_s": raw.rate(backlog),
                    "engine_before_tasks_per_s": engine_before.times(deployment.tts_workers).rate(backlog),
                    "engine_after_tasks_per_s": engine_after.times(deployment.tts_workers).rate(backlog),
                    "efficiency": drain.efficiency(raw, backlog),
                }
                results["deployments"][deployment.key] = figures
    return results


def table(results: dict[str, Any]) -> str:
    accept = results["accept"]
    deployments = results["deployments"]
    overhead = deployments["default"]["overhead"]
    rows = [
        ("figure", "measured", "target", "spec's server"),
        ("accepted POST /generate per s (32 conn.)", f"{accept['requests_per_s']:.0f}", ">= 3000", "315"),
        (
            "  latency p50 / p90 / p99 ms",
            f"{accept['p50_ms']:.1f} / {accept['p90_ms']:.1f} / {accept['p99_ms']:.1f}",
            "",
            "",
        ),
        ("  non-2xx / socket errors", f"{accept['non_2xx']} / {accept['socket_errors']}", "0", ""),
        ("  200s / messages stored in Kafka", f"{accept['accepted_in_all']} / {accept['stored']}", "all stored", ""),
        ("one task at a time: submit -> webhook p50 ms", f"{overhead['end_to_end_p50_ms']:.0f}", "", ""),
        ("  engine alone, same text, ms", f"{overhead['engine_ms']:.0f}", "", ""),
        ("  overhead p50 ms", f"{overhead['overhead_p50_ms']:.1f}", "<= 30", "~250"),
        ("  overhead p95 ms", f"{overhead['overhead_p95_ms']:.1f}", "<= 60", ""),
    ]
    for figures in deployments.values():
        drain = figures["drain"]
        rows += [
            (f"backlog of {drain['tasks']}, {figures['label']}", "", "", ""),
            (
                "  drain tasks/s (engine alone)",
                f"{drain['tasks_per_s']:.2f} ({drain['engine_tasks_per_s']:.2f})",
                "",
                "",
            ),
            ("  efficiency (drain / engine alone)", f"{100 * drain['efficiency']:.0f}%", ">= 90%", "61%"),
        ]
        for name, process in figures["processes"].items():
            memory = f"RSS {process['rss_mib']:.0f} MiB, CPU {process['cpu_ms_per_task']:.1f} ms/task"
            rows.append((f"    {name}", memory, "", ""))
    one, two = deployments["default"]["drain"], deployments["two_workers"]["drain"]
    rows.append(("2 TTS workers / 1 TTS worker (drain)", f"{two['tasks_per_s'] / one['tasks_per_s']:.2f}x", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--accept-seconds", type=int, default=10)
    parser.add_argument("--overhead-tasks", type=int, default=30)
    parser.add_argument("--backlog", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = run(args)
    print()
    print(table(results))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
