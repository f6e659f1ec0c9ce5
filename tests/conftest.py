"""Session fixtures: real SeaweedFS, Tansu, the service and a webhook receiver, all on loopback.

Every server is started by the suite on ports chosen free at start, with its data in a temporary
directory, and stopped at the end, so the suite runs beside a dev server without colliding.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver, child_processes, embedded_servers, wait_for_health
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.infra.process import ChildProcess, child_env, free_port

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-secret-for-webhook-signing!").decode()
API_USER = "tester"
API_PASSWORD = "correct-horse-battery-staple"
API_KEY = "sk-test-0123456789abcdef"  # a bearer key of the service (API_KEYS)
SERVICE_START_TIMEOUT_S = 90
PROMPT_MAX_BYTES = 4 * 1024 * 1024


def speech_like_wav(path: Path, seconds: float = 2.0, sample_rate: int = 16000) -> Path:
    """A voiced, amplitude-modulated tone: valid audio a prompt check accepts."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(path, signal.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def prompt_dir(session_dir: Path) -> Path:
    """The service's PROMPT_DIR: the repository's example voice plus generated ones."""
    directory = session_dir / "prompts"
    directory.mkdir()
    shutil.copy(ROOT / "prompts" / "example.wav", directory / "example.wav")
    speech_like_wav(directory / "tone.wav")
    # A symlink that leads out of the prompt directory: must never be readable through the API.
    outside = directory.parent / "outside-secret.wav"
    speech_like_wav(outside)
    (directory / "escape.wav").symlink_to(outside)
    return directory


@pytest.fixture(scope="session")
def infra(session_dir: Path) -> Iterator[EmbeddedInfra]:
    with embedded_servers(session_dir / "infra") as servers:
        yield servers


@pytest.fixture(scope="session")
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


SLOW_RESPONSE_S = 8.0


class _PromptFiles(SimpleHTTPRequestHandler):
    """Static files (with Last-Modified / 304 support), plus misbehaving endpoints:
    ``/slow/...`` answers after SLOW_RESPONSE_S, ``/loop/...`` redirects to itself forever."""

    hits: Counter[str]

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_RESPONSE_S)
        if self.path.startswith("/loop/"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *_args: Any) -> None:
        pass


@dataclass
class FileServer:
    """Serves a directory over HTTP on loopback: prompt URLs for the workers to download."""

    root: Path
    port: int
    hits: Counter[str]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def file_server(session_dir: Path) -> Iterator[FileServer]:
    root = session_dir / "served"
    root.mkdir()
    hits: Counter[str] = Counter()
    handler = type("Handler", (_PromptFiles,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield FileServer(root, server.server_address[1], hits)
    server.shutdown()
    server.server_close()


@dataclass
class Service:
    base_url: str
    auth: tuple[str, str]
    process: ChildProcess
    data_dir: Path
    env: dict[str, str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, auth=self.auth, timeout=30)


def own_topics(prefix: str) -> dict[str, str]:
    """Settings that give a stack its own topics, consumer groups and key prefix in the shared
    bucket: it never takes another stack's tasks, and its /health counts only its own workers."""
    return {
        "KAFKA_TASK_TOPIC": f"{prefix}_tasks",
        "KAFKA_INTERACTIVE_TOPIC": f"{prefix}_interactive",
        "KAFKA_REPLY_TOPIC": f"{prefix}_replies",
        "KAFKA_RESULT_TOPIC": f"{prefix}_results",
        "KAFKA_DEAD_LETTER_TOPIC": f"{prefix}_dead",
        "KAFKA_WEBHOOK_RETRY_TOPIC": f"{prefix}_webhook_retries",
        "KAFKA_TTS_CONSUMER_GROUP": f"{prefix}_tts",
        "KAFKA_UPLOAD_CONSUMER_GROUP": f"{prefix}_upload",
        "S3_KEY_PREFIX": prefix,
    }


def launch_service(
    workdir: Path,
    infra: EmbeddedInfra,
    prompt_dir: Path,
    *args: str,
    start_timeout_s: float = SERVICE_START_TIMEOUT_S,
    **extra_env: str,
) -> Service:
    """`indextts-api all` against ``infra``, with the Piper engine and test-friendly timings."""
    port = free_port()
    data_dir = workdir / "service"
    env = child_env(
        {
            **infra.settings_env(),
            "API_USERNAME": API_USER,
            "API_PASSWORD": API_PASSWORD,
            "API_KEYS": f"{API_KEY},second-key-for-rotation",
            "DATA_DIR": str(data_dir),
            "PROMPT_DIR": str(prompt_dir),
            "ALLOW_PRIVATE_URLS": "true",
            "ENGINE": "piper",
            "S3_PRESIGN": "true",
            "WEBHOOK_RETRY_DELAYS_S": "0.5,1,1,1,1,1",
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "WEBHOOK_TIMEOUT_S": "3",
            # Short enough for the tests of slow prompt servers to finish quickly.
            "PROMPT_READ_TIMEOUT_S": "2",
            "PROMPT_DOWNLOAD_TIMEOUT_S": "4",
            "PROMPT_MAX_BYTES": str(PROMPT_MAX_BYTES),
            "PROMPT_MAX_SECONDS": "30",
            **extra_env,
        }
    )
    argv = [sys.executable, "-m", "indextts_api", "all", "--host", "127.0.0.1", "--port", str(port), *args]
    process = ChildProcess("service", argv, workdir / "service.log", env=env, cwd=workdir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process, start_timeout_s)
    except BaseException:
        process.stop()
        raise
    return Service(base_url, (API_USER, API_PASSWORD), process, data_dir, env)


@contextlib.contextmanager
def api_role(workdir: Path, infra: EmbeddedInfra, name: str, **extra_env: str) -> Iterator[str]:
    """`indextts-api api` alone against ``infra`` (no workers); yields its base URL."""
    port = free_port()
    env = child_env(
        {
            **infra.settings_env(),
            "API_USERNAME": API_USER,
            "API_PASSWORD": API_PASSWORD,
            "DATA_DIR": str(workdir / name),
            **extra_env,
        }
    )
    argv = [sys.executable, "-m", "indextts_api", "api", "--port", str(port)]
    process = ChildProcess(name, argv, workdir / f"{name}.log", env=env, cwd=workdir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process, 60, healthy=False)
        yield base_url
    finally:
        assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="session")
def public_api(session_dir: Path, infra: EmbeddedInfra, prompt_dir: Path) -> Iterator[str]:
    """The API role alone as production runs it (ALLOW_PRIVATE_URLS=false, a prompt directory), on
    topics of its own that no worker reads: a task it accepts is only stored. Its base URL."""
    with api_role(
        session_dir,
        infra,
        "public-api",
        ALLOW_PRIVATE_URLS="false",
        PROMPT_DIR=str(prompt_dir),
        KAFKA_TOPIC_PARTITIONS="1",
        **own_topics("public_api"),
    ) as base_url:
        yield base_url


def stop_service(service: Service) -> None:
    code = service.process.stop(grace_s=60)
    assert code == 0, f"service did not stop cleanly (exit {code}):\n{service.process.log_tail(4000)}"


@pytest.fixture(scope="session")
def service(session_dir: Path, infra: EmbeddedInfra, prompt_dir: Path) -> Iterator[Service]:
    running = launch_service(session_dir, infra, prompt_dir)
    yield running
    stop_service(running)


@pytest.fixture
def api(service: Service) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "indextts_api", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def worker_pids(parent_pid: int, role: str) -> list[int]:
    """PIDs of the ``role`` processes (tts-worker, upload-worker) that ``parent_pid`` started."""
    return [pid for pid, argv in child_processes(parent_pid).items() if role.encode() in argv]


def wait_for_worker(parent_pid: int, role: str, not_pid: int | None = None, timeout_s: float = 30) -> int:
    """The PID of a (new) ``role`` worker once it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [pid for pid in worker_pids(parent_pid, role) if pid != not_pid]
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise TimeoutError(f"no {role} under {parent_pid} within {timeout_s} s")
