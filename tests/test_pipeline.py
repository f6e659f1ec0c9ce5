"""End to end through the running service: API → Kafka → TTS worker → Kafka → upload worker → S3 → webhook."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

from indextts_api.config import Settings
from indextts_api.devtools import WebhookReceiver
from indextts_api.ids import new_task_uuid
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.kafka import make_producer
from indextts_api.schemas import TaskMessage, TaskParams
from indextts_api.storage import audio_key, make_s3_client
from tests.conftest import FileServer, Service, speech_like_wav

TEXT = "Hello, this is a test of text-to-speech generation. It should last more than a second."
WEBHOOK_TIMEOUT_S = 90


def submit(api: httpx.Client, receiver: WebhookReceiver, prompt: str, text: str = TEXT, **params: object) -> str:
    body: dict[str, object] = {"spk_audio_prompt": prompt, "text": text, "hook_url": receiver.url("/tts-complete")}
    if params:
        body["params"] = params
    response = api.post("/generate", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "queued"
    assert answer["message"] == "Task has been queued for processing"
    return str(answer["task_uuid"])


def fetch_wav(url: str) -> tuple[np.ndarray, int, httpx.Response]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    audio, sample_rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
    return audio, sample_rate, response


def assert_speech(audio: np.ndarray, sample_rate: int, min_seconds: float) -> None:
    seconds = len(audio) / sample_rate
    assert seconds > min_seconds, f"only {seconds:.2f} s of audio"
    # Speech, not silence: a real RMS level, and energy that varies between syllables and pauses.
    frame = sample_rate // 50
    energies = np.array([np.sqrt(np.mean(audio[i : i + frame] ** 2)) for i in range(0, len(audio) - frame, frame)])
    assert energies.max() > 0.02
    assert np.percentile(energies, 90) > 4 * np.percentile(energies, 10) + 1e-6


def test_task_delivers_webhook_with_playable_wav(api: httpx.Client, receiver: WebhookReceiver) -> None:
    task_uuid = submit(api, receiver, "example.wav")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    payload = hook.payload
    assert hook.path == "/tts-complete"
    assert hook.headers["Content-Type"] == "application/json"
    assert set(payload) == {"task_uuid", "status", "s3_url", "timestamp"}
    assert payload["status"] == "success"
    assert isinstance(payload["timestamp"], int)
    assert f"/{task_uuid}.wav" in payload["s3_url"]
    audio, sample_rate, response = fetch_wav(payload["s3_url"])
    assert response.headers["content-type"] == "audio/wav"
    assert sample_rate == 22050
    assert_speech(audio, sample_rate, min_seconds=1.0)


def test_prompt_url_is_downloaded(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer, prompt_dir: Path
) -> None:
    shutil.copy(prompt_dir / "example.wav", file_server.root / "voice.wav")
    task_uuid = submit(api, receiver, file_server.url("voice.wav"), text="A prompt from a URL works too.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload
    audio, sample_rate, _ = fetch_wav(hook.payload["s3_url"])
    assert_speech(audio, sample_rate, min_seconds=1.0)


def test_prompt_url_404_gives_failure_webhook(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    task_uuid = submit(api, receiver, file_server.url("no-such-voice.wav"))
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    payload = hook.payload
    assert set(payload) == {"task_uuid", "status", "error_message", "timestamp"}
    assert payload["status"] == "failed"
    assert "404" in payload["error_message"]


def test_prompt_that_is_not_audio_gives_failure_webhook(
    api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer
) -> None:
    (file_server.root / "not-audio.wav").write_text("<html>this is a web page, not a voice</html>")
    task_uuid = submit(api, receiver, file_server.url("not-audio.wav"))
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "failed"
    assert "not a readable audio file" in hook.payload["error_message"]


def test_flac_prompt_in_prompt_dir(api: httpx.Client, receiver: WebhookReceiver, prompt_dir: Path) -> None:
    audio, sample_rate = soundfile.read(prompt_dir / "example.wav")
    soundfile.write(prompt_dir / "voice.flac", audio, sample_rate, format="FLAC")
    task_uuid = submit(api, receiver, "voice.flac", text="Flac prompts are audio too.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload


def test_spool_and_downloads_are_cleaned_up(
    api: httpx.Client, receiver: WebhookReceiver, service: Service, file_server: FileServer
) -> None:
    speech_like_wav(file_server.root / "cleanup.wav")
    task_uuid = submit(api, receiver, file_server.url("cleanup.wav"), text="Nothing is left behind.")
    receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    spool = service.data_dir / "spool"
    leftovers = [p.name for p in spool.iterdir() if task_uuid in p.name]
    assert leftovers == []
    assert list((service.data_dir / "prompt-cache").glob("download-*")) == []


def broker_settings(infra: EmbeddedInfra) -> Settings:
    return Settings(_env_file=None, **{name.lower(): value for name, value in infra.settings_env().items()})  # type: ignore[arg-type]


def store_audio(settings: Settings, task_uuid: str) -> bytes:
    """Put a short WAV where the task's audio goes; returns its bytes."""
    stored = io.BytesIO()
    soundfile.write(stored, np.zeros(2205, dtype=np.int16), 22050, format="WAV", subtype="PCM_16")
    make_s3_client(settings).put_object(
        Bucket=settings.bucket, Key=audio_key(settings, task_uuid), Body=stored.getvalue()
    )
    return stored.getvalue()


def queue_task(settings: Settings, receiver: WebhookReceiver, task_uuid: str, queued_at: float) -> None:
    """Put a task on the task topic stamped ``queued_at``, straight to the broker as the API would."""
    task = TaskMessage(
        task_uuid=task_uuid,
        spk_audio_prompt="example.wav",
        text=TEXT,
        hook_url=receiver.url("/direct"),
        params=TaskParams(),
        timestamp=queued_at,
    )
    producer = make_producer(settings)
    producer.produce(
        settings.kafka_task_topic,
        key=task_uuid.encode(),
        value=task.model_dump_json().encode(),
        timestamp=int(queued_at * 1000),
    )
    assert producer.flush(30) == 0


def test_redelivered_task_whose_audio_is_stored_is_not_synthesized_again(
    service: Service, infra: EmbeddedInfra, receiver: WebhookReceiver
) -> None:
    """A task queued before the worker got its partition may have been handled by the previous
    owner, which stored the audio and died before committing: the stored audio is the answer."""
    settings = broker_settings(infra)
    task_uuid = new_task_uuid(settings.task_id_key)
    stored = store_audio(settings, task_uuid)
    queue_task(settings, receiver, task_uuid, queued_at=time.time() - 3600)
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload
    _, _, response = fetch_wav(hook.payload["s3_url"])
    assert response.content == stored, "the stored audio was replaced by a new synthesis"


def test_task_queued_while_the_worker_holds_its_partition_is_synthesized_without_a_check(
    service: Service, infra: EmbeddedInfra, receiver: WebhookReceiver
) -> None:
    """No other worker can have handled a task queued well after this worker got its partition, so
    the worker does not ask S3 first (here the object put there beforehand shows it: it is replaced)."""
    settings = broker_settings(infra)
    task_uuid = new_task_uuid(settings.task_id_key)
    stored = store_audio(settings, task_uuid)
    queue_task(settings, receiver, task_uuid, queued_at=time.time() + 600)
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    assert hook.payload["status"] == "success", hook.payload
    audio, sample_rate, response = fetch_wav(hook.payload["s3_url"])
    assert response.content != stored
    assert_speech(audio, sample_rate, min_seconds=1.0)


def test_a_task_handled_again_by_the_same_worker_is_checked_against_s3(
    service: Service, infra: EmbeddedInfra, receiver: WebhookReceiver
) -> None:
    """The same task twice on a worker's own watch (a retried produce, a result whose fate was
    unknown): the second time the worker finds the audio in S3 and does not synthesize it again."""
    settings = broker_settings(infra)
    task_uuid = new_task_uuid(settings.task_id_key)
    queue_task(settings, receiver, task_uuid, queued_at=time.time() + 600)
    receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    queue_task(settings, receiver, task_uuid, queued_at=time.time() + 600)
    hooks = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S, count=2)
    assert [hook.payload["status"] for hook in hooks] == ["success", "success"]
    assert f"task {task_uuid} already has its audio in S3" in service.process.log_tail(200_000)
