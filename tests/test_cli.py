"""The entry points as a newcomer and an operator use them: embedded default, roles, refusals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.infra.process import ChildProcess, child_env, free_port
from tests.conftest import ROOT, port_open, run_cli, wait_for_health

# No Kafka or S3 settings at all: the service must start its own. Ports are chosen free (0) so
# the suite can run beside a dev server on the default ports.
SCRUBBED = ("KAFKA_", "S3_", "API_USERNAME", "API_PASSWORD", "ALLOW_PRIVATE_URLS", "DATA_DIR", "PROMPT_DIR")


def embedded_env() -> dict[str, str]:
    env = {k: v for k, v in child_env({}).items() if not k.startswith(SCRUBBED)}
    env.update(EMBEDDED_KAFKA_PORT="0", EMBEDDED_S3_PORT="0")
    return env


def start_api_server(workdir: Path, port: int, *extra: str) -> ChildProcess:
    argv = [sys.executable, str(ROOT / "api_server.py"), "--port", str(port), *extra]
    return ChildProcess("api_server", argv, workdir / f"api_server-{port}.log", env=embedded_env(), cwd=workdir)


def stop_and_check(process: ChildProcess) -> None:
    process.proc.send_signal(signal.SIGINT)
    code = process.stop(grace_s=60)
    assert code == 0, process.log_tail(4000)


@pytest.mark.timeout(240)
def test_api_server_runs_on_the_embedded_default_and_keeps_queued_tasks(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    shutil.copy(ROOT / "prompts" / "example.wav", tmp_path / "prompts" / "example.wav")
    receiver = WebhookReceiver().start()
    try:
        # First run: no TTS worker, so the task can only wait in the broker.
        port = free_port()
        first = start_api_server(tmp_path, port, "--tts-workers", "0")
        wait_for_health(f"http://127.0.0.1:{port}", first, 90, healthy=False)
        credentials = json.loads((tmp_path / "data" / "embedded-credentials.json").read_text())
        auth = (credentials["api_username"], credentials["api_password"])
        # Shown on the first start; the banner is printed once the API listens, so it may follow
        # the first answer to /health by a few milliseconds.
        login = f"Login    {auth[0]} / {auth[1]}"
        deadline = time.monotonic() + 10
        while login not in first.log_tail(20000) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert login in first.log_tail(20000)
        response = httpx.post(
            f"http://127.0.0.1:{port}/generate",
            auth=auth,
            timeout=30,
            json={
                "spk_audio_prompt": "example.wav",
                "text": "Queued before a restart, spoken after it.",
                "hook_url": receiver.url(),
            },
        )
        assert response.status_code == 200, response.text
        task_uuid = response.json()["task_uuid"]
        stop_and_check(first)
        assert receiver.received == []

        # Second run on the same data directory: the queued task is delivered.
        port = free_port()
        second = start_api_server(tmp_path, port)
        try:
            wait_for_health(f"http://127.0.0.1:{port}", second, 90)
            assert auth[1] not in second.log_tail(20000)  # the password is printed once only
            [hook] = receiver.wait_for(task_uuid, 120)
            assert hook.payload["status"] == "success", hook.payload
            audio = httpx.get(hook.payload["s3_url"], timeout=30)
            assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
        finally:
            stop_and_check(second)
    finally:
        receiver.stop()


def test_infra_role_prints_settings_and_serves_them(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "indextts_api", "infra", "--data-dir", str(tmp_path / "data")]
    process = ChildProcess("infra", argv, tmp_path / "infra.log", env=embedded_env(), cwd=tmp_path)
    try:
        settings: dict[str, str] = {}
        expected = {
            "KAFKA_BOOTSTRAP_SERVERS",
            "KAFKA_PROFILE",  # embedded: the roles pointed at Tansu keep the tuning measured for it
            "S3_ENDPOINT_URL",
            "S3_ACCESS_KEY",
            "S3_SECRET_KEY",
            "S3_BUCKET_NAME",
            "S3_REGION",
        }
        deadline = time.monotonic() + 60
        while set(settings) != expected and time.monotonic() < deadline:
            for line in process.log_tail(20000).splitlines():
                key, sep, value = line.partition("=")
                if sep and key in expected:
                    settings[key] = value
            time.sleep(0.2)
        assert set(settings) == expected, process.log_tail()
        kafka_port = int(settings["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
        assert port_open(kafka_port)
        s3 = httpx.get(settings["S3_ENDPOINT_URL"], timeout=5)
        assert s3.status_code in (200, 403)
    finally:
        stop_and_check(process)


def test_external_infrastructure_without_credentials_refuses_to_start(tmp_path: Path, infra: EmbeddedInfra) -> None:
    env = {**embedded_env(), **infra.settings_env()}
    for role in ("all", "api"):
        result = run_cli(role, "--port", str(free_port()), env=env, cwd=tmp_path)
        assert result.returncode == 2
        assert "API_USERNAME and API_PASSWORD must be set" in result.stderr


def test_placeholder_password_is_refused(tmp_path: Path, infra: EmbeddedInfra) -> None:
    env = {**embedded_env(), **infra.settings_env(), "API_USERNAME": "your_username", "API_PASSWORD": "your_password"}
    result = run_cli("api", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "placeholder" in result.stderr
    assert "your_password" not in result.stderr  # the rule is named, the value given is not echoed


def test_password_that_is_not_utf8_is_refused_without_echoing_it(tmp_path: Path, infra: EmbeddedInfra) -> None:
    """No client could send it (Basic credentials are decoded as UTF-8): refused at start-up."""
    env = {**embedded_env(), **infra.settings_env(), "API_USERNAME": "operator"}
    env_bytes = {key.encode(): value.encode() for key, value in env.items()}
    env_bytes[b"API_PASSWORD"] = b"secret-\xff-bytes"
    result = subprocess.run(
        [sys.executable, "-m", "indextts_api", "api"],
        env=env_bytes,  # type: ignore[arg-type]
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "API_PASSWORD is not valid UTF-8" in result.stderr
    assert "secret-" not in result.stderr


def test_worker_roles_require_shared_infrastructure(tmp_path: Path) -> None:
    for role in ("tts-worker", "upload-worker", "api"):
        result = run_cli(role, env=embedded_env(), cwd=tmp_path)
        assert result.returncode == 2
        assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr


def test_help_lists_the_spec_options() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "api_server.py"), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for option in (
        "--host",
        "--port",
        "--model_dir",
        "--fp16",
        "--deepspeed",
        "--cuda_kernel",
        "--tts-workers",
        "--upload-workers",
        "--engine",
    ):
        assert option in result
