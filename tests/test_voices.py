"""Registered voices through the running service: register by upload and by URL, list, get,
synthesize with voice:<id> (the second task hits the worker's cache), delete."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver
from indextts_api.ids import new_task_uuid
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.kafka import make_producer
from indextts_api.schemas import TaskMessage, TaskParams
from tests.conftest import API_PASSWORD, API_USER, PROMPT_MAX_BYTES, FileServer, Service
from tests.test_observability import metric_value
from tests.test_pipeline import WEBHOOK_TIMEOUT_S, broker_settings


def recording(seconds: float = 2.0, rate: int = 16000, seed: int = 0, channels: int = 1, fmt: str = "WAV") -> bytes:
    """A voiced, amplitude-modulated tone; ``seed`` changes its pitch, hence its voice id."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 150 + 7 * seed
    signal = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    # As 16-bit integers: libsndfile scales floats differently for WAV and FLAC, integers not.
    frames = np.round(np.repeat(signal[:, None], channels, axis=1) * 32767).astype(np.int16)
    out = io.BytesIO()
    soundfile.write(out, frames, rate, format=fmt, subtype="PCM_16")
    return out.getvalue()


def register(api: httpx.Client, data: bytes | None = None, **fields: str) -> httpx.Response:
    files = {"file": ("voice.wav", data, "application/octet-stream")} if data is not None else None
    form = {"name": "Narrator", **fields}
    if files is None:
        return api.post("/voices", data=form)
    return api.post("/voices", data=form, files=files)


def metrics(service: Service) -> str:
    return httpx.get(f"{service.base_url}/metrics", timeout=10).text


def submit(api: httpx.Client, receiver: WebhookReceiver, prompt: str, **extra: object) -> httpx.Response:
    body = {"spk_audio_prompt": prompt, "text": "A registered voice speaks.", "hook_url": receiver.url("/voices")}
    return api.post("/generate", json={**body, **extra})


def test_register_by_upload_is_content_addressed(api: httpx.Client) -> None:
    first = register(api, recording(seed=1), metadata=json.dumps({"speaker": "Ann", "lang": "en"}))
    assert first.status_code == 201, first.text
    voice = first.json()
    assert len(voice["voice_id"]) == 32 and int(voice["voice_id"], 16) >= 0
    assert voice["reference"] == f"voice:{voice['voice_id']}"
    assert voice["name"] == "Narrator" and voice["metadata"] == {"speaker": "Ann", "lang": "en"}
    assert voice["source"] == "upload" and voice["sample_rate"] == 16000 and voice["channels"] == 1
    assert abs(voice["duration_s"] - 2.0) < 0.01
    assert -20 < voice["rms_dbfs"] < -10 and voice["peak_dbfs"] < -9
    # The same audio again, and the same samples in another container: the same voice, unchanged.
    again = register(api, recording(seed=1), name="Another name")
    assert again.status_code == 200 and again.json()["voice_id"] == voice["voice_id"]
    assert again.json()["name"] == "Narrator"
    as_flac = register(api, recording(seed=1, fmt="FLAC"))
    assert as_flac.status_code == 200 and as_flac.json()["voice_id"] == voice["voice_id"]

    listed = api.get("/voices", params={"limit": 1000}).json()
    assert voice["voice_id"] in [item["voice_id"] for item in listed["voices"]]
    shown = api.get(f"/voices/{voice['voice_id']}")
    assert shown.status_code == 200
    # The stored audio, decoded by FFmpeg: the normalised recording (mono 16-bit WAV, 2 s).
    stored = httpx.get(shown.json()["audio_url"], timeout=30)
    assert stored.status_code == 200
    with av.open(io.BytesIO(stored.content)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert (stream.codec_context.name, stream.codec_context.sample_rate) == ("pcm_s16le", 16000)
        assert stream.codec_context.channels == 1
    assert samples == 32000


def test_register_by_url_normalises(api: httpx.Client, file_server: FileServer) -> None:
    (file_server.root / "stereo-44k.wav").write_bytes(recording(seed=2, rate=44100, channels=2))
    answer = register(api, url=file_server.url("stereo-44k.wav"), name="From a URL")
    assert answer.status_code == 201, answer.text
    voice = answer.json()
    assert voice["source"] == file_server.url("stereo-44k.wav")
    assert (voice["sample_rate"], voice["channels"]) == (22050, 1)  # mono, at most 22,050 Hz
    assert abs(voice["duration_s"] - 2.0) < 0.01
    missing = register(api, url=file_server.url("no-such-voice.wav"))
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]


def _square(seconds: float = 2.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, np.sign(np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "fields", "message"),
    [
        (recording(seconds=0.5), {}, "too short"),
        (recording(seconds=31, rate=8000), {}, "too long"),
        (b"RIFF not really a WAV file" * 1000, {}, "not a readable audio file"),
        (_square(), {}, "clipped"),
        (None, {}, "either file or url"),
        (recording(), {"url": "https://example.com/v.wav"}, "either file or url"),
        (recording(), {"metadata": "[1, 2]"}, "metadata must be a JSON object"),
        (recording(), {"metadata": "{not json"}, "metadata must be a JSON object"),
        (recording(), {"name": " "}, "name must be 1 to 100 characters"),
    ],
    ids=["short", "long", "not-audio", "clipped", "neither", "both", "metadata-list", "metadata-bad", "blank-name"],
)
def test_unusable_recordings_are_refused(
    api: httpx.Client, data: bytes | None, fields: dict[str, str], message: str
) -> None:
    answer = register(api, data, **fields)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]


def test_silent_recording_is_refused(api: httpx.Client) -> None:
    out = io.BytesIO()
    soundfile.write(out, np.full(32000, 1e-4, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    answer = register(api, out.getvalue())
    assert answer.status_code == 400 and "silent" in answer.json()["error"]


def test_upload_over_the_prompt_limit_is_413(api: httpx.Client) -> None:
    answer = register(api, b"\x00" * (PROMPT_MAX_BYTES + 128 * 1024))
    assert answer.status_code == 413, answer.text


def test_public_api_refuses_an_internal_voice_url(public_api: str) -> None:
    with httpx.Client(base_url=public_api, auth=(API_USER, API_PASSWORD), timeout=30) as client:
        answer = register(client, url="http://127.0.0.1:9/voice.wav")
        assert answer.status_code == 400 and "only public URLs" in answer.json()["error"]
        assert client.post("/voices", data={"name": "x"}, auth=("nobody", "wrong")).status_code == 401


def test_voice_synthesizes_and_hits_the_workers_cache(
    api: httpx.Client, receiver: WebhookReceiver, service: Service
) -> None:
    voice_id = register(api, recording(seed=3)).json()["voice_id"]
    before = metrics(service)
    first = submit(api, receiver, f"voice:{voice_id}")
    assert first.status_code == 200, first.text
    [hook] = receiver.wait_for(first.json()["task_uuid"], WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload
    between = metrics(service)
    misses = metric_value(between, "indextts_prompt_cache_total", source="voice", outcome="miss")
    assert misses == metric_value(before, "indextts_prompt_cache_total", source="voice", outcome="miss") + 1
    # The same voice as speaker and as emotion reference: taken from the worker's cache, no download.
    second = submit(
        api, receiver, f"voice:{voice_id}", params={"emo_control_method": 1, "emo_audio_prompt": f"voice:{voice_id}"}
    )
    assert second.status_code == 200, second.text
    [hook] = receiver.wait_for(second.json()["task_uuid"], WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload
    after = metrics(service)
    assert metric_value(after, "indextts_prompt_cache_total", source="voice", outcome="miss") == misses
    hits_before = metric_value(between, "indextts_prompt_cache_total", source="voice", outcome="hit")
    assert metric_value(after, "indextts_prompt_cache_total", source="voice", outcome="hit") >= hits_before + 2


def test_unknown_voice_is_400_at_submission(api: httpx.Client, receiver: WebhookReceiver) -> None:
    unknown = submit(api, receiver, "voice:" + "0" * 32)
    assert unknown.status_code == 400 and "is not registered" in unknown.json()["error"]
    malformed = submit(api, receiver, "voice:not-an-id")
    assert malformed.status_code == 400 and "not a voice id" in malformed.json()["error"]
    emotion = submit(
        api, receiver, "example.wav", params={"emo_control_method": 1, "emo_audio_prompt": "voice:" + "1" * 32}
    )
    assert emotion.status_code == 400 and "params.emo_audio_prompt" in emotion.json()["error"]
    assert api.get("/voices/" + "0" * 32).status_code == 404
    assert api.get("/voices/../tasks").status_code == 404


def test_deleted_voice_is_gone_and_its_waiting_tasks_fail(
    api: httpx.Client, receiver: WebhookReceiver, infra: EmbeddedInfra
) -> None:
    voice_id = register(api, recording(seed=4)).json()["voice_id"]
    used = submit(api, receiver, f"voice:{voice_id}")
    [hook] = receiver.wait_for(used.json()["task_uuid"], WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success"  # the worker now holds the voice in its cache

    assert api.delete(f"/voices/{voice_id}").status_code == 204
    assert voice_id not in [item["voice_id"] for item in api.get("/voices", params={"limit": 1000}).json()["voices"]]
    assert api.get(f"/voices/{voice_id}").status_code == 404
    assert api.delete(f"/voices/{voice_id}").status_code == 404
    refused = submit(api, receiver, f"voice:{voice_id}")
    assert refused.status_code == 400 and "is not registered" in refused.json()["error"]

    # A task that was already waiting in the queue when the voice was deleted (accepted before):
    # the worker does not use its cached copy, the task fails saying why.
    settings = broker_settings(infra)
    task_uuid = new_task_uuid(settings.task_id_key)
    waiting = TaskMessage(
        task_uuid=task_uuid,
        spk_audio_prompt=f"voice:{voice_id}",
        text="Too late.",
        hook_url=receiver.url("/voices"),
        params=TaskParams(),
        timestamp=time.time(),
    )
    producer = make_producer(settings)
    producer.produce(settings.kafka_task_topic, key=task_uuid.encode(), value=waiting.model_dump_json().encode())
    assert producer.flush(30) == 0
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "failed"
    assert f"voice {voice_id} does not exist" in hook.payload["error_message"]


def test_voices_are_documented(service: Service) -> None:
    schema = httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()
    assert {"post", "get"} <= set(schema["paths"]["/voices"])
    assert {"get", "delete"} <= set(schema["paths"]["/voices/{voice_id}"])
    form = schema["paths"]["/voices"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]
    generate = schema["components"]["schemas"]["TaskCreate"]
    assert "voice:" in generate["properties"]["spk_audio_prompt"]["description"]
    assert {"response_format", "sample_rate", "bitrate"} <= set(generate["properties"])


def test_prompt_cache_has_the_voice_file(service: Service, api: httpx.Client, receiver: WebhookReceiver) -> None:
    """The worker keeps a voice under its id (the audio's hash), so IndexTTS2's path-keyed speaker
    cache sees one path per voice."""
    voice_id = register(api, recording(seed=5)).json()["voice_id"]
    answer = submit(api, receiver, f"voice:{voice_id}")
    receiver.wait_for(answer.json()["task_uuid"], WEBHOOK_TIMEOUT_S)
    cached = Path(service.data_dir) / "prompt-cache" / f"voice-{voice_id}.wav"
    assert cached.is_file()
    assert soundfile.info(str(cached)).samplerate == 16000
