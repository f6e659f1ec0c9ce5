#!/usr/bin/env python3
"""The specification's test script: checks a running server end to end.

    python test_api.py                       # against http://127.0.0.1:7861 (start it with `make run`)
    python test_api.py --url URL --user U --password P
    python test_api.py --suite               # runs the whole pytest suite instead (same as `make test`)

Against a running server it checks /health, 401 without credentials, 400 for a missing field, then
queues a task with the example voice, receives its webhook on a local receiver and downloads the WAV.
Credentials default to API_USERNAME/API_PASSWORD from the settings, else to the embedded mode's
generated ones in DATA_DIR/embedded-credentials.json.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
try:
    import indextts_api  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(ROOT / "src"))

import httpx
import soundfile

from indextts_api.config import get_settings
from indextts_api.devtools import WebhookReceiver


def default_credentials() -> tuple[str, str]:
    settings = get_settings()
    if settings.api_username and settings.api_password:
        return settings.api_username, settings.api_password.get_secret_value()
    stored = settings.data_dir / "embedded-credentials.json"
    if stored.exists():
        data = json.loads(stored.read_text())
        return data["api_username"], data["api_password"]
    raise SystemExit("no credentials: pass --user/--password or set API_USERNAME/API_PASSWORD")


def check(name: str, ok: bool, detail: object = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail and not ok else ""))
    return ok


def run_against_server(url: str, auth: tuple[str, str], prompt: str, timeout_s: float) -> int:
    results = []
    health = httpx.get(f"{url}/health", timeout=10)
    results.append(
        check(
            "GET /health answers healthy",
            health.status_code == 200 and health.json().get("status") == "healthy",
            health.text,
        )
    )
    receiver = WebhookReceiver().start()
    try:
        body = {
            "spk_audio_prompt": prompt,
            "text": "Hello, this is a test of text-to-speech generation.",
            "hook_url": receiver.url("/webhook/tts-complete"),
        }
        unauthorized = httpx.post(f"{url}/generate", json=body, timeout=10)
        results.append(check("POST /generate without credentials is 401", unauthorized.status_code == 401))
        missing = httpx.post(f"{url}/generate", json={"text": "x"}, auth=auth, timeout=10)
        results.append(check("POST /generate with a missing field is 400", missing.status_code == 400))
        started = time.monotonic()
        queued = httpx.post(f"{url}/generate", json=body, auth=auth, timeout=30)
        if not check("POST /generate queues the task", queued.status_code == 200, queued.text):
            return 1
        task_uuid = queued.json()["task_uuid"]
        try:
            [hook] = receiver.wait_for(task_uuid, timeout_s)
        except TimeoutError as exc:
            check("webhook received", False, exc)
            return 1
        payload = hook.payload
        results.append(
            check(
                f"webhook received in {time.monotonic() - started:.2f} s", payload.get("status") == "success", payload
            )
        )
        if payload.get("status") == "success":
            audio = httpx.get(payload["s3_url"], timeout=30)
            data, rate = soundfile.read(io.BytesIO(audio.content))
            results.append(check(f"s3_url serves a WAV of {len(data) / rate:.2f} s", len(data) / rate > 1.0))
    finally:
        receiver.stop()
    return 0 if all(results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--prompt", default="example.wav", help="spk_audio_prompt to use (URL or prompt path)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the webhook")
    parser.add_argument("--suite", action="store_true", help="run the pytest suite instead")
    args = parser.parse_args()
    if args.suite:
        return subprocess.call([sys.executable, "-m", "pytest"], cwd=ROOT)
    auth = (args.user, args.password) if args.user and args.password else default_credentials()
    return run_against_server(args.url.rstrip("/"), auth, args.prompt, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
