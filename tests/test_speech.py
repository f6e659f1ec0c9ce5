"""POST /v1/audio/speech through the running service, with the official `openai` SDK, unmodified:
audio streamed as it is synthesized, OpenAI's SSE events, its errors, the fast lane ahead of a
batch backlog, a disconnect that cancels; and POST /generate's `Prefer: wait`."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver
from tests.conftest import API_KEY, Service
from tests.test_pipeline import WEBHOOK_TIMEOUT_S, assert_speech

FIVE_SENTENCES = (
    "The first sentence is short. The second one follows it. A third sentence comes next. "
    "Then there is a fourth. And the fifth sentence ends it."
)


def sndfile_decode(data: bytes) -> tuple[np.ndarray, int]:
    """``data`` decoded by libsndfile, block by block: a stream does not say its length up front
    (a streamed FLAC's STREAMINFO and a streamed WAV's sizes are left open)."""
    with soundfile.SoundFile(io.BytesIO(data)) as audio:
        blocks = list(audio.blocks(blocksize=65536, dtype="float32"))
        return np.concatenate(blocks), audio.samplerate


def speech_stream(service: Service, body: dict[str, Any]) -> contextlib.AbstractContextManager[httpx.Response]:
    """POST /v1/audio/speech with a bearer key, streamed (plain httpx: what the SDK does not expose)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.stream("POST", f"{service.base_url}/v1/audio/speech", json=body, headers=headers, timeout=120)


@pytest.fixture
def client(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0) as sdk:
        yield sdk


def wait_for_task(api: httpx.Client, task_uuid: str, statuses: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        task: dict[str, Any] = api.get(f"/tasks/{task_uuid}").json()
        if task["status"] in statuses or time.monotonic() > deadline:
            return task
        time.sleep(0.2)


def test_openai_sdk_gets_mp3(client: openai.OpenAI, api: httpx.Client) -> None:
    response = client.audio.speech.with_raw_response.create(
        model="indextts2", voice="alloy", input="Hello there, this is the OpenAI endpoint speaking."
    )
    assert response.headers["content-type"] == "audio/mpeg"
    task_uuid = response.headers["x-task-id"]
    # Decoded by libsndfile (the stream was encoded by FFmpeg's LAME): 24 kHz mono speech.
    audio, rate = sndfile_decode(response.parse().content)
    assert rate == 24000 and audio.ndim == 1
    assert_speech(audio, rate, min_seconds=1.0)
    # A task like the others: stored, and its WAV in S3.
    task = wait_for_task(api, task_uuid, {"success", "failed"})
    assert task["status"] == "success", task
    assert abs(len(audio) / rate - task["timings"]["audio_s"]) < 0.1


def test_streaming_response_arrives_in_pieces(client: openai.OpenAI) -> None:
    arrivals: list[tuple[float, int]] = []
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=FIVE_SENTENCES, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for chunk in response.iter_bytes():
            arrivals.append((time.monotonic() - started, len(chunk)))
    total = sum(size for _, size in arrivals)
    assert total % 2 == 0 and total / 2 / 24000 > 3.0, total
    # Sentence by sentence: audio came before the synthesis ended, in several pieces.
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0][0] < arrivals[-1][0] - 0.05, arrivals


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_openai_format_decodes(client: openai.OpenAI, response_format: str) -> None:
    data = client.audio.speech.create(
        model="tts-1",
        voice="echo",
        input="Every format plays.",
        response_format=response_format,  # type: ignore[arg-type]
    ).content
    if response_format == "pcm":
        samples, rate = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24000
    elif response_format in ("aac", "flac"):
        # libsndfile has no AAC decoder, and cannot read a FLAC stream of open length: FFmpeg's.
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
            rate = stream.codec_context.sample_rate
        if samples.dtype == np.int16:  # FLAC decodes to 16-bit integers
            samples = samples.astype(np.float32) / 32768
    else:
        samples, rate = sndfile_decode(data)
    assert rate in (24000, 48000), rate  # Opus decodes at 48 kHz
    assert_speech(samples, rate, min_seconds=0.5)


def test_sse_events_are_openais(service: Service) -> None:
    body = {
        "model": "gpt-4o-mini-tts",
        "voice": "alloy",
        "input": FIVE_SENTENCES,
        "stream_format": "sse",
        "response_format": "pcm",
    }
    events: list[dict[str, Any]] = []
    with speech_stream(service, body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 3
    pcm = b"".join(base64.b64decode(event["audio"]) for event in events[:-1])
    assert_speech(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768, 24000, min_seconds=3.0)
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == len(FIVE_SENTENCES)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0


def test_errors_are_openais(client: openai.OpenAI, service: Service) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        client.audio.speech.create(model="tts-1", voice="alloy", input="   ")
    assert "input must not be empty" in empty.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        client.audio.speech.create(model="tts-1", voice="nobody-knows-me", input="Hi.")
    assert "neither a registered voice" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as unregistered:
        client.audio.speech.create(model="tts-1", voice="0" * 32, input="Hi.")
    assert "is not registered" in unregistered.value.message
    wrong = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")


def test_what_cannot_be_honoured_is_said(client: openai.OpenAI) -> None:
    response = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="Slowly, please.", speed=0.5, instructions="Speak like a pirate.",
        extra_body={"seed": 7},
    )  # fmt: skip
    assert response.headers["x-ignored-parameters"] == "speed, instructions, seed"
    assert len(response.parse().content) > 1000


def test_registered_voice_and_emotion_params(client: openai.OpenAI, api: httpx.Client) -> None:
    from tests.test_voices import recording

    voice_id = api.post("/voices", data={"name": "Speech"}, files={"file": ("v.wav", recording(seed=9))}).json()[
        "voice_id"
    ]
    data = client.audio.speech.create(
        model="indextts2", voice=voice_id, input="A registered voice.", response_format="wav",
        extra_body={"params": {"emo_control_method": 2, "vec1": 0.8}},
    ).content  # fmt: skip
    audio, rate = sndfile_decode(data)
    assert rate == 24000
    assert_speech(audio, rate, min_seconds=0.5)


def test_interactive_request_overtakes_a_backlog(
    client: openai.OpenAI, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    """Behind 100 batch tasks, an interactive request waits at most for the synthesis in progress:
    at most one batch task starts between its submission and its first audio."""
    batch = []
    for index in range(100):
        body = {
            "spk_audio_prompt": "example.wav",
            "text": f"Backlog task number {index}.",
            "hook_url": receiver.url("/backlog"),
        }
        answer = api.post("/generate", json=body)
        assert answer.status_code == 200
        batch.append(answer.json()["task_uuid"])
    time.sleep(0.5)  # the worker is busy with the backlog now
    submitted = time.time()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="I do not wait for the backlog.", response_format="pcm"
    ) as response:
        first_audio = None
        for _chunk in response.iter_bytes():
            first_audio = first_audio or time.time()
    assert first_audio is not None
    task_uuid = response.headers["x-task-id"]
    for batch_uuid in batch:
        receiver.wait_for(batch_uuid, WEBHOOK_TIMEOUT_S)
    tasks = [api.get(f"/tasks/{batch_uuid}").json() for batch_uuid in batch]
    overtaken = sum(1 for task in tasks if task["started_at"] > first_audio)
    assert overtaken >= 50, overtaken  # most of the backlog was still waiting
    # It waited for the engine at most as long as one batch synthesis lasts (the one in progress).
    interactive = wait_for_task(api, task_uuid, {"success"})["timings"]
    longest_batch = max(task["timings"]["synthesis_s"] for task in tasks)
    assert interactive["engine_wait_s"] <= longest_batch + 0.05, (interactive, longest_batch)
    # And its first audio came within that wait, its own synthesis and the queue's overhead.
    first_byte_s = first_audio - submitted
    assert first_byte_s < interactive["engine_wait_s"] + interactive["synthesis_s"] + 1.5, (first_byte_s, interactive)


def test_disconnect_cancels_the_task(service: Service, api: httpx.Client) -> None:
    long_text = " ".join(f"This is sentence number {n} of a long reading." for n in range(60))
    body = {"model": "tts-1", "voice": "alloy", "input": long_text, "response_format": "pcm"}
    with speech_stream(service, body) as response:
        assert response.status_code == 200
        task_uuid = response.headers["x-task-id"]
        next(response.iter_bytes())  # the first audio, then the client goes away
    task = wait_for_task(api, task_uuid, {"canceled", "success", "failed"})
    assert task["status"] == "canceled", task
    assert "client disconnected" in task["error_message"]


def test_prefer_wait_returns_the_finished_task(api: httpx.Client, receiver: WebhookReceiver) -> None:
    body = {
        "spk_audio_prompt": "example.wav",
        "text": "Wait for me.",
        "hook_url": receiver.url("/wait"),
        "response_format": "mp3",
    }
    answer = api.post("/generate", json=body, headers={"Prefer": "wait=30"})
    assert answer.status_code == 200, answer.text
    task = answer.json()
    assert task["status"] == "success" and task["s3_url"].split("?")[0].endswith(".mp3"), task
    assert answer.headers["preference-applied"] == "wait=30"
    stored = httpx.get(task["s3_url"], timeout=30)
    assert stored.status_code == 200 and stored.headers["content-type"] == "audio/mpeg"
    # The webhook still comes.
    [hook] = receiver.wait_for(task["task_uuid"], WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success"
    # Not finished within the wait: the usual queued answer.
    quick = api.post("/generate", json=body, headers={"Prefer": "wait=0.001"})
    assert quick.status_code == 200 and quick.json()["status"] == "queued"
    assert api.post("/generate", json=body, headers={"Prefer": "wait=lots"}).status_code == 400
