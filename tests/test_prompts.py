"""Audio inputs handled like a product: formats, bounds, failures, caching, long text. Through the service."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver
from tests.conftest import (
    PROMPT_MAX_BYTES,
    SLOW_RESPONSE_S,
    FileServer,
    Service,
    speech_like_wav,
    wait_for_worker,
    worker_pids,
)
from tests.test_pipeline import TEXT, WEBHOOK_TIMEOUT_S, assert_speech, fetch_wav, submit
from tests.test_prompt_bounds import misbehaving_server

# The service's PROMPT_READ_TIMEOUT_S and PROMPT_DOWNLOAD_TIMEOUT_S (conftest).
READ_TIMEOUT_S = 2.0
DOWNLOAD_TIMEOUT_S = 4.0


def failure_of(api: httpx.Client, receiver: WebhookReceiver, prompt: str) -> str:
    task_uuid = submit(api, receiver, prompt, text="This prompt should not be accepted.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "failed", hook.payload
    return str(hook.payload["error_message"])


def test_mp3_prompt_url_works(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer, prompt_dir: Path
) -> None:
    audio, rate = soundfile.read(prompt_dir / "example.wav")
    soundfile.write(file_server.root / "voice.mp3", audio, rate, format="MP3")
    task_uuid = submit(api, receiver, file_server.url("voice.mp3"), text="An MP3 voice works.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload


def test_ogg_prompt_url_works(api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer) -> None:
    speech_like_wav(file_server.root / "tone.wav")
    audio, rate = soundfile.read(file_server.root / "tone.wav")
    soundfile.write(file_server.root / "voice.ogg", audio, rate, format="OGG", subtype="VORBIS")
    task_uuid = submit(api, receiver, file_server.url("voice.ogg"), text="An Ogg voice works.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload


def test_prompt_too_big_fails_with_reason(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    (file_server.root / "huge.wav").write_bytes(b"\0" * (PROMPT_MAX_BYTES + 1))
    assert "larger than" in failure_of(api, receiver, file_server.url("huge.wav"))


def test_prompt_too_long_fails_with_reason(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    speech_like_wav(file_server.root / "long.wav", seconds=40, sample_rate=8000)
    assert "too long" in failure_of(api, receiver, file_server.url("long.wav"))


def test_prompt_too_short_fails_with_reason(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    speech_like_wav(file_server.root / "blip.wav", seconds=0.1)
    assert "too short" in failure_of(api, receiver, file_server.url("blip.wav"))


@pytest.mark.timeout(120)
def test_slow_prompt_server_times_out_and_worker_goes_on(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    speech_like_wav(file_server.root / "slow.wav")
    message = failure_of(api, receiver, file_server.url("slow/slow.wav"))
    assert "timed out" in message
    # The worker was not hung: the next task succeeds, well before the slow server would have answered.
    task_uuid = submit(api, receiver, "example.wav", text="Still working.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success"
    assert SLOW_RESPONSE_S > 4  # the service's PROMPT_DOWNLOAD_TIMEOUT_S in conftest


def test_redirect_loop_fails_with_reason(api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer) -> None:
    assert "too many redirects" in failure_of(api, receiver, file_server.url("loop/voice.wav"))


def test_popular_prompt_url_is_downloaded_once(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer, prompt_dir: Path
) -> None:
    (file_server.root / "popular.wav").write_bytes((prompt_dir / "example.wav").read_bytes())
    for text in ("First use of a popular voice.", "Second use of the same voice."):
        task_uuid = submit(api, receiver, file_server.url("popular.wav"), text=text)
        [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
        assert hook.payload["status"] == "success"
    assert file_server.hits["/popular.wav"] == 1


@pytest.mark.timeout(240)
def test_long_text_is_spoken_whole(api: httpx.Client, receiver: WebhookReceiver) -> None:
    sentence = "The committee reviewed every proposal carefully before the final vote was taken. "
    text = (sentence * 40)[:3000]
    assert len(text) == 3000
    task_uuid = submit(api, receiver, "example.wav", text=text, max_text_tokens_per_segment=60)
    [hook] = receiver.wait_for(task_uuid, 200)
    assert hook.payload["status"] == "success", hook.payload
    audio, rate, _ = fetch_wav(hook.payload["s3_url"])
    # One sentence takes Piper about 4.5 s; all 37 of them must be there, not the first segment only.
    short_id = submit(api, receiver, "example.wav", text=sentence.strip())
    [short] = receiver.wait_for(short_id, WEBHOOK_TIMEOUT_S)
    one, _, _ = fetch_wav(short.payload["s3_url"])
    sentences = text.count(".")
    assert len(audio) / len(one) > 0.9 * sentences
    assert_speech(audio, rate, min_seconds=100)
    # Speech until the end: the last seconds are not silence.
    assert np.sqrt(np.mean(audio[-3 * rate :] ** 2)) > 0.01


@pytest.mark.timeout(120)
def test_prompt_server_that_drips_is_cut_at_the_download_deadline(api: httpx.Client, receiver: WebhookReceiver) -> None:
    # A byte every 1.5 s never trips the 2 s read timeout; before, the worker waited for all of them.
    with misbehaving_server() as server:
        started = time.monotonic()
        message = failure_of(api, receiver, server.url(f"drip/{READ_TIMEOUT_S - 0.5}"))
        elapsed = time.monotonic() - started
    assert "download timed out" in message
    assert elapsed < DOWNLOAD_TIMEOUT_S + 6, f"the failure took {elapsed:.1f} s"


@pytest.mark.timeout(120)
def test_failure_messages_name_no_server_path(
    api: httpx.Client, receiver: WebhookReceiver, service: Service, file_server: FileServer, prompt_dir: Path
) -> None:
    junk = b"RIFF this is not audio" * 100
    (prompt_dir / "junk-local.wav").write_bytes(junk)
    (file_server.root / "junk.wav").write_bytes(junk)
    server_paths = [str(path) for path in (service.data_dir, prompt_dir)]
    server_paths += [str(Path(path).resolve()) for path in server_paths]
    for prompt in ("junk-local.wav", file_server.url("junk.wav")):
        message = failure_of(api, receiver, prompt)
        assert message == "spk_audio_prompt is not a readable audio file (WAV, FLAC, MP3, OGG): Format not recognised."
    # A path the file system refuses (through a regular file) is refused by the API, as plainly.
    body = {"spk_audio_prompt": "example.wav/x.wav", "text": TEXT, "hook_url": receiver.url("/tts-complete")}
    response = api.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert "does not exist in the prompt directory" in response.json()["error"]
    assert not [path for path in server_paths if path in response.text]


def _status_kb(pid: int, field: str) -> int:
    found = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found, field
    return int(found.group(1))


@pytest.mark.timeout(300)
def test_ten_thousand_character_word_is_spoken_in_bounded_memory(
    api: httpx.Client, receiver: WebhookReceiver, service: Service
) -> None:
    """Said as one utterance, this word grew the Piper worker by 1.4-3.1 GB; cut into segments of
    at most 300 characters, by about 200 MB (see engines/segments.py)."""
    worker = wait_for_worker(service.process.pid, "tts-worker")
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # a fresh peak (VmHWM) from here on
    before_kb = _status_kb(worker, "VmRSS")
    task_uuid = submit(api, receiver, "example.wav", text="a" * 10_000)
    [hook] = receiver.wait_for(task_uuid, 240)
    growth_mb = (_status_kb(worker, "VmHWM") - before_kb) / 1024
    assert hook.payload["status"] == "success", hook.payload
    assert worker in worker_pids(service.process.pid, "tts-worker")  # the same worker, alive
    assert growth_mb < 500, f"the worker grew by {growth_mb:.0f} MB"
    audio, rate, _ = fetch_wav(hook.payload["s3_url"])
    print(f"10,000-character word: {len(audio) / rate:.0f} s of audio, worker peak growth {growth_mb:.0f} MB")
    assert len(audio) / rate > 30
