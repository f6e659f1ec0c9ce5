"""The system under test: embedded Tansu + SeaweedFS, a webhook receiver, and service roles."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from indextts_api.devtools import WebhookReceiver, wait_for_health
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.infra.process import ChildProcess, child_env, free_port

ROOT = Path(__file__).resolve().parent.parent
API_USER = "bench"
API_PASSWORD = "bench-password-not-for-production"
START_TIMEOUT_S = 120.0


@dataclass
class Role:
    """A running `indextts-api` process (``all`` or ``api``) and where it answers."""

    process: ChildProcess
    base_url: str

    @property
    def auth(self) -> tuple[str, str]:
        return (API_USER, API_PASSWORD)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@contextlib.contextmanager
def service_role(work_dir: Path, infra: EmbeddedInfra, role: str, name: str, *args: str, **env: str) -> Iterator[Role]:
    """`indextts-api <role>` against ``infra`` with the Piper engine; stopped (SIGTERM) afterwards."""
    port = free_port()
    environment = child_env(
        {
            **infra.settings_env(),
            "API_USERNAME": API_USER,
            "API_PASSWORD": API_PASSWORD,
            "DATA_DIR": str(work_dir / name),
            "PROMPT_DIR": str(ROOT / "prompts"),
            "ALLOW_PRIVATE_URLS": "true",  # the webhook receiver is on loopback
            "ENGINE": "piper",
            **env,
        }
    )
    argv = [sys.executable, "-m", "indextts_api", role, "--host", "127.0.0.1", "--port", str(port), *args]
    process = ChildProcess(name, argv, work_dir / f"{name}.log", env=environment, cwd=work_dir)
    running = Role(process, f"http://127.0.0.1:{port}")
    try:
        wait_for_health(running.base_url, process, START_TIMEOUT_S, healthy=role == "all")
        yield running
    finally:
        process.stop(grace_s=60)
