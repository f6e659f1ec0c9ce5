"""python -m bench [--accept-seconds 10] [--overhead-tasks 30] [--backlog 100]"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.accept import measure_accept
from bench.pipeline import (
    ONE_SENTENCE,
    EngineBaseline,
    measure_drain,
    measure_engine,
    measure_overhead,
    resident_memory,
    short_texts,
)
from bench.stack import ROOT, infrastructure, service_role, webhook_receiver

ACCEPT_TOPIC = "bench_accept_tasks"  # no worker reads it: the accept run measures the API and the broker


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}
    backlog = short_texts(args.backlog)
    with tempfile.TemporaryDirectory(prefix="indextts-bench-") as scratch:
        work_dir = Path(scratch)
        with infrastructure(work_dir) as infra, webhook_receiver() as receiver:
            print("engine baseline (this process, same voice, same texts) ...", flush=True)
            lone = measure_engine([ONE_SENTENCE], repeats=15)
            batch = measure_engine(backlog, repeats=1)
            baseline = EngineBaseline({**batch.seconds_per_text, **lone.seconds_per_text})
            results["engine"] = {
                "one_sentence_ms": 1000 * baseline.seconds_per_text[ONE_SENTENCE],
                "backlog_tasks_per_s": baseline.rate(backlog),
            }

            print(f"accept rate: wrk, 32 connections, {args.accept_seconds} s ...", flush=True)
            with service_role(work_dir, infra, "api", "api-only", KAFKA_TASK_TOPIC=ACCEPT_TOPIC) as api:
                accept = measure_accept(
                    api.base_url, api.auth, infra.kafka_bootstrap_servers, ACCEPT_TOPIC, args.accept_seconds, work_dir
                )
            results["accept"] = dataclasses.asdict(accept)

            for workers in (1, 2):
                print(f"service with {workers} TTS worker(s) ...", flush=True)
                with service_role(work_dir, infra, "all", f"all-{workers}", "--tts-workers", str(workers)) as service:
                    pids = {"api": service.process.pid, **{c.name: c.pid for c in infra.children}}
                    if workers == 1:
                        overhead = measure_overhead(service, receiver, baseline, args.overhead_tasks)
                        results["overhead"] = dataclasses.asdict(overhead)
                    drain = measure_drain(service, receiver, baseline, backlog)
                    results[f"drain_{workers}"] = {**dataclasses.asdict(drain), "efficiency": drain.efficiency}
                    results[f"memory_{workers}"] = {
                        name: {"rss_mib": now, "peak_mib": peak} for name, (now, peak) in resident_memory(pids).items()
                    }
    return results


def table(results: dict[str, Any]) -> str:
    accept, overhead, one, two = results["accept"], results["overhead"], results["drain_1"], results["drain_2"]
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
        (
            "  200s / messages stored in Kafka",
            f"{accept['accepted_in_all']} / {accept['stored']}",
            "stored >= 200s",
            "",
        ),
        ("one task: submit -> webhook p50 ms", f"{overhead['end_to_end_p50_ms']:.0f}", "", ""),
        ("  engine alone, same text, ms", f"{overhead['engine_ms']:.0f}", "", ""),
        ("  overhead p50 ms", f"{overhead['overhead_p50_ms']:.1f}", "<= 30", "~250"),
        ("  overhead p95 ms", f"{overhead['overhead_p95_ms']:.1f}", "<= 60", ""),
        (f"backlog of {one['tasks']}: drain tasks/s, 1 TTS worker", f"{one['tasks_per_s']:.2f}", "", ""),
        ("  engine alone, same texts, tasks/s", f"{one['engine_tasks_per_s']:.2f}", "", ""),
        ("  efficiency (drain / engine)", f"{100 * one['efficiency']:.0f}%", ">= 90%", "61%"),
        ("  drain tasks/s, 2 TTS workers", f"{two['tasks_per_s']:.2f}", "", ""),
        ("  2 workers / 1 worker", f"{two['tasks_per_s'] / one['tasks_per_s']:.2f}x", "", ""),
    ]
    for workers in (1, 2):
        for name, memory in results[f"memory_{workers}"].items():
            rows.append(
                (
                    f"RSS MiB, {workers} TTS worker(s): {name}",
                    f"{memory['rss_mib']:.0f} (peak {memory['peak_mib']:.0f})",
                    "",
                    "",
                )
            )
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
