"""Audio inputs handled like a product: formats, bounds, failures, caching, long text. Through the service."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver
from tests.conftest import PROMPT_MAX_BYTES, SLOW_RESPONSE_S, FileServer, speech_like_wav
from tests.test_pipeline import WEBHOOK_TIMEOUT_S, assert_speech, fetch_wav, submit


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
