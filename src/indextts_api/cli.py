"""Command line: ``indextts-api {all,api,tts-worker,upload-worker,infra}`` and ``python api_server.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from indextts_api.config import configure
from indextts_api.logs import setup_logging

ROLES = ("all", "api", "tts-worker", "upload-worker", "infra")


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that only the options given override the environment and .env.
    add = parser.add_argument
    add("--host", default=None, help="host to run the API server on [default: 127.0.0.1]")
    add("--port", type=int, default=None, help="port to run the API server on [default: 7861]")
    add(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=None,
        help="model checkpoints directory [default: ./checkpoints]",
    )
    add("--fp16", action="store_true", default=None, help="use FP16 for inference if available")
    add("--deepspeed", action="store_true", default=None, help="use DeepSpeed to accelerate if available")
    add(
        "--cuda_kernel",
        "--cuda-kernel",
        dest="cuda_kernel",
        action="store_true",
        default=None,
        help="use CUDA kernel for inference if available",
    )
    add(
        "--device",
        default=None,
        help="IndexTTS2 device: auto (one GPU per TTS worker where there are several), cpu, cuda:N [default: auto]",
    )
    add(
        "--tts-worker-max-tasks",
        "--tts_worker_max_tasks",
        dest="tts_worker_max_tasks",
        type=int,
        default=None,
        help="restart a TTS worker process after this many tasks; 0: never [default: 0]",
    )
    add(
        "--tts-workers",
        "--tts_workers",
        dest="tts_workers",
        type=int,
        default=None,
        help="number of TTS generation worker processes [default: 1]",
    )
    add(
        "--upload-workers",
        "--upload_workers",
        dest="upload_workers",
        type=int,
        default=None,
        help="number of upload worker processes [default: 1]",
    )
    add(
        "--engine",
        choices=("auto", "indextts2", "piper"),
        default=None,
        help="TTS engine: auto picks indextts2 when its checkpoints and package are present and it loads, "
        "else piper [default: auto]",
    )
    add("--data-dir", dest="data_dir", default=None, help="embedded infrastructure data [default: ./data]")
    add("--prompt-dir", dest="prompt_dir", default=None, help="directory of local prompt files [default: ./prompts]")
    add("--log-level", dest="log_level", default=None, help="DEBUG, INFO, WARNING, ERROR [default: INFO]")


def build_parser(prog: str = "indextts-api") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="IndexTTS text-to-speech job service")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    helps = {
        "all": "API + TTS workers + upload workers (+ embedded Kafka and S3 when not configured)",
        "api": "the HTTP API only (needs KAFKA_BOOTSTRAP_SERVERS)",
        "tts-worker": "one TTS worker process (needs Kafka and S3 settings)",
        "upload-worker": "one upload worker process (needs Kafka and S3 settings)",
        "infra": "only the embedded Kafka and S3; prints their settings as KEY=VALUE lines",
    }
    for role in ROLES:
        _add_server_options(roles.add_parser(role, help=helps[role], description=helps[role]))
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in vars(args).items() if key != "role" and value is not None}


def main(argv: Sequence[str] | None = None, prog: str = "indextts-api") -> int:
    args = build_parser(prog).parse_args(argv)
    overrides = overrides_from(args)
    try:
        settings = configure(**overrides)
    except ValidationError as exc:
        # The rules broken, without the values given: those may be secrets.
        problems = [
            f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        ]
        print("error: invalid configuration:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, args.role)

    from indextts_api import service

    if args.role == "all":
        return service.run_all(overrides)
    if args.role == "api":
        return service.run_api()
    if args.role == "infra":
        return service.run_infra(overrides)
    return service.run_worker(args.role)


if __name__ == "__main__":
    sys.exit(main())
