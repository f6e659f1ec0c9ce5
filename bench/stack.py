"""The system under test: embedded Tansu + SeaweedFS, a webhook receiver, and service roles."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from indextts_api.config import Settings
from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra, start_embedded
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
def infrastructure(work_dir: Path) -> Iterator[EmbeddedInfra]:
    """Embedded Tansu and SeaweedFS on free loopback ports, data in ``work_dir``."""
    settings = Settings(_env_file=None, data_dir=work_dir / "infra", embedded_kafka_port=0, embedded_s3_port=0)
    servers = start_embedded(settings, need_kafka=True, need_s3=True)
    try:
        yield servers
    finally:
        servers.stop()


@contextlib.contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _wait_until_answering(role: Role, healthy: bool) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not role.process.alive():
            raise RuntimeError(f"{role.process.name} exited:\n{role.process.log_tail(4000)}")
        with contextlib.suppress(httpx.HTTPError):
            code = httpx.get(f"{role.base_url}/health", timeout=5).status_code
            if code == 200 or (not healthy and code == 503):
                return
        time.sleep(0.2)
    raise TimeoutError(f"{role.process.name} did not answer within {START_TIMEOUT_S} s")


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
        _wait_until_answering(running, healthy=role == "all")
        yield running
    finally:
        process.stop(grace_s=60)
