"""The IndexTTS2 adapter's exact calls, through the real pipeline, against a recording stand-in.

The real class runs in ``tests/test_indextts2_real.py`` (random weights); what it was called with
is easier to check here: ``tests/standin`` provides ``indextts.infer_v2`` with the real class's
signatures (``indextts2-inference`` 2.1.1) and records every call as JSON lines. This module runs its own
API, TTS worker and upload worker on the session's Kafka and S3, with topics and consumer groups
of its own: the Piper service of the other tests never takes these tasks, and these workers never
take theirs. Each test submits a task over HTTP, waits for its webhook, then reads what the
stand-in was called with for that task's (unique) text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile

from indextts_api.devtools import WebhookReceiver
from indextts_api.engines.indextts2 import CAPABILITY_GAPS, REQUIRED_DIRS, REQUIRED_FILES, WARMUP_MAX_MEL_TOKENS
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.infra.process import ChildProcess, child_env, free_port
from tests.conftest import API_PASSWORD, API_USER, ROOT, FileServer, own_topics, speech_like_wav, wait_for_health

STANDIN_DIR = ROOT / "tests" / "standin"
START_TIMEOUT_S = 90
WEBHOOK_TIMEOUT_S = 90
STOP_GRACE_S = 30
RAISE_MARKER = "RAISE_IN_ENGINE"
HOOK_PATH = "/indextts2-hook"
EMOTION_PROMPT = "idx-emotion.wav"

# Every parameter sent with a value different from its default, so a parameter the adapter drops
# or mixes up with another cannot pass by accident.
GENERATION_PARAMS: dict[str, Any] = {
    "do_sample": False,
    "top_p": 0.55,
    "top_k": 42,
    "temperature": 1.3,
    "length_penalty": -0.5,
    "num_beams": 2,
    "repetition_penalty": 7.5,
    "max_mel_tokens": 900,
    "emo_random": True,
    "max_text_tokens_per_segment": 77,
}


@dataclass
class IndexStack:
    """This module's API + TTS worker (stand-in IndexTTS2) + upload worker."""

    base_url: str
    model_dir: Path
    record_path: Path
    api: ChildProcess
    tts_worker: ChildProcess
    upload_worker: ChildProcess

    @property
    def processes(self) -> list[ChildProcess]:
        # Workers before the API when stopping, as the service does.
        return [self.tts_worker, self.upload_worker, self.api]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, auth=(API_USER, API_PASSWORD), timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (alive: {p.alive()}) ---\n{p.log_tail(3000)}" for p in self.processes)

    def records(self) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def infer_index(self, text: str) -> tuple[list[dict[str, Any]], int]:
        """All records, and the index of the one ``infer`` call for ``text``."""
        records = self.records()
        hits = [i for i, r in enumerate(records) if r["call"] == "infer" and r["text"] == text]
        assert len(hits) == 1, f"expected one infer call for {text!r}, got {len(hits)}"
        return records, hits[0]

    def infer_call(self, text: str) -> dict[str, Any]:
        records, index = self.infer_index(text)
        return records[index]


def _wait_for_engine(stack: IndexStack, timeout_s: float) -> None:
    """Wait until the TTS worker constructed its model: a failed import or config shows at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["call"] == "__init__" for r in stack.records()):
            return
        if not stack.tts_worker.alive():
            raise RuntimeError(f"tts worker exited with {stack.tts_worker.proc.returncode}:\n{stack.logs()}")
        time.sleep(0.1)
    raise TimeoutError(f"the stand-in IndexTTS2 was not constructed within {timeout_s} s:\n{stack.logs()}")


def _model_dir(path: Path) -> Path:
    """The required checkpoint set, as empty files: enough for the adapter's presence check."""
    path.mkdir()
    for name in REQUIRED_FILES:
        (path / name).touch()
    for name in REQUIRED_DIRS:
        (path / name).mkdir()
    return path


@pytest.fixture(scope="module")
def indextts_stack(
    tmp_path_factory: pytest.TempPathFactory, infra: EmbeddedInfra, prompt_dir: Path
) -> Iterator[IndexStack]:
    base = tmp_path_factory.mktemp("indextts2")
    model_dir = _model_dir(base / "checkpoints")
    record_path = base / "standin-calls.jsonl"
    port = free_port()
    inherited_path = os.environ.get("PYTHONPATH")
    env = child_env(
        {
            **infra.settings_env(),
            "ENGINE": "indextts2",
            "MODEL_DIR": str(model_dir),
            "PYTHONPATH": os.pathsep.join(p for p in (str(STANDIN_DIR), inherited_path) if p),
            "INDEXTTS_STANDIN_RECORD": str(record_path),
            "INDEXTTS_STANDIN_RAISE_MARKER": RAISE_MARKER,
            "FP16": "true",
            "CUDA_KERNEL": "true",
            "DEEPSPEED": "false",
            "DEVICE": "cpu",
            "ENGINE_LANGUAGE": "en",
            # Shared by the two workers: the spool (claim check) lives under it.
            "DATA_DIR": str(base / "data"),
            "PROMPT_DIR": str(prompt_dir),
            # Own topics, groups and key prefix: never compete with the Piper service's workers.
            **own_topics("idx"),
            "API_USERNAME": API_USER,
            "API_PASSWORD": API_PASSWORD,
            "ALLOW_PRIVATE_URLS": "true",
            # The embedded bucket is private: the webhook's s3_url must be presigned to be readable.
            "S3_PRESIGN": "true",
            "WEBHOOK_RETRY_DELAYS_S": "0.5,1",
        }
    )

    def start(role: str, *extra: str) -> ChildProcess:
        argv = [sys.executable, "-m", "indextts_api", role, *extra]
        # cwd in the temporary directory: no .env of a developer's checkout is read.
        return ChildProcess(f"idx-{role}", argv, base / f"{role}.log", env=env, cwd=base)

    started: list[ChildProcess] = []
    try:
        # The api role creates the topics; the workers subscribe only once they exist. Without a
        # TTS worker yet, /health answers 503 (engine down): answering at all is enough here.
        api = start("api", "--host", "127.0.0.1", "--port", str(port))
        started.append(api)
        base_url = f"http://127.0.0.1:{port}"
        wait_for_health(base_url, api, START_TIMEOUT_S, healthy=False)
        tts_worker = start("tts-worker")
        started.append(tts_worker)
        upload_worker = start("upload-worker")
        started.append(upload_worker)
        stack = IndexStack(base_url, model_dir, record_path, api, tts_worker, upload_worker)
        _wait_for_engine(stack, START_TIMEOUT_S)
        # Healthy (200) once the TTS worker's heartbeat is in the bucket.
        wait_for_health(base_url, api, START_TIMEOUT_S)
    except BaseException:
        for process in reversed(started):
            process.stop()
        raise
    yield stack
    codes = {process.name: process.stop(grace_s=STOP_GRACE_S) for process in stack.processes}
    assert all(code == 0 for code in codes.values()), f"unclean exits {codes}:\n{stack.logs()}"


@pytest.fixture(scope="module")
def index_api(indextts_stack: IndexStack) -> Iterator[httpx.Client]:
    with indextts_stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def emotion_prompt(prompt_dir: Path) -> str:
    """A second prompt, different audio from the speaker's (a shorter tone)."""
    speech_like_wav(prompt_dir / EMOTION_PROMPT, seconds=1.2)
    return EMOTION_PROMPT


def unique_text(label: str) -> str:
    """Texts identify a task's records in the stand-in's log, so each task gets its own."""
    return f"{label} {uuid.uuid4().hex}."


def submit(client: httpx.Client, receiver: WebhookReceiver, prompt: str, text: str, **params: Any) -> str:
    body: dict[str, Any] = {"spk_audio_prompt": prompt, "text": text, "hook_url": receiver.url(HOOK_PATH)}
    if params:
        body["params"] = params
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["task_uuid"])


def await_webhook(stack: IndexStack, receiver: WebhookReceiver, task_uuid: str) -> dict[str, Any]:
    """The task's webhook payload; fails early, with the logs, if one of the processes died."""
    deadline = time.monotonic() + WEBHOOK_TIMEOUT_S
    while True:
        try:
            hooks = receiver.wait_for(task_uuid, timeout_s=1.0)
        except TimeoutError:
            dead = [p.name for p in stack.processes if not p.alive()]
            if dead:
                pytest.fail(f"{', '.join(dead)} died while waiting for task {task_uuid}:\n{stack.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no webhook for task {task_uuid} within {WEBHOOK_TIMEOUT_S} s:\n{stack.logs()}")
            continue
        assert hooks[0].path == HOOK_PATH
        payload: dict[str, Any] = hooks[0].payload
        return payload


def assert_wav_at(url: str) -> None:
    """The stored audio is the stand-in's 22,050 Hz mono WAV, fetched from the webhook's URL."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    assert response.content[:4] == b"RIFF" and response.content[8:12] == b"WAVE"
    info = soundfile.info(io.BytesIO(response.content))
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    assert info.duration == pytest.approx(1.5, abs=0.01)


def synthesize(
    stack: IndexStack,
    client: httpx.Client,
    receiver: WebhookReceiver,
    label: str,
    prompt: str = "example.wav",
    **params: Any,
) -> dict[str, Any]:
    """Submit one task, expect success and a WAV in S3; the stand-in's ``infer`` record for it."""
    text = unique_text(label)
    task_uuid = submit(client, receiver, prompt, text, **params)
    payload = await_webhook(stack, receiver, task_uuid)
    assert payload["status"] == "success", payload
    assert f"/idx/{task_uuid}.wav" in payload["s3_url"]  # under this stack's key prefix
    assert_wav_at(payload["s3_url"])
    return stack.infer_call(text)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- construction and /health ---------------------------------------------------------------------


def test_model_constructed_once_with_settings(indextts_stack: IndexStack) -> None:
    inits = [r for r in indextts_stack.records() if r["call"] == "__init__"]
    # One model per process (it is not thread-safe), built by the TTS worker itself.
    assert len(inits) == 1, inits
    [init] = inits
    assert init["pid"] == indextts_stack.tts_worker.pid
    model_dir = indextts_stack.model_dir
    assert init["cfg_path"] == str(model_dir / "config.yaml")
    assert init["model_dir"] == str(model_dir)
    assert init["use_fp16"] is True
    assert init["use_cuda_kernel"] is True
    assert init["use_deepspeed"] is False
    assert init["device"] == "cpu"
    assert init["language"] == "en"


def test_warm_up_before_first_task(indextts_stack: IndexStack) -> None:
    """The worker synthesizes once, short, between construction and its first task."""
    records = indextts_stack.records()
    assert records[0]["call"] == "__init__"
    warmup = records[1]
    assert warmup["call"] == "infer", records[:3]
    assert warmup["output_path"] is None
    assert warmup["generation_kwargs"] == {"max_mel_tokens": WARMUP_MAX_MEL_TOKENS}
    assert [r for r in records if r["call"] == "infer" and r["text"] == warmup["text"]] == [warmup]  # once


def test_health_reports_indextts2(indextts_stack: IndexStack) -> None:
    response = httpx.get(f"{indextts_stack.base_url}/health", timeout=10)
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["status"] == "healthy"
    assert health["model_version"] == "2.0"
    assert health["engine"]["name"] == "indextts2"
    assert health["engine"]["model_version"] == "2.0"
    # The real model honours every parameter but do_sample (it always samples).
    assert health["engine"]["ignores"] == CAPABILITY_GAPS
    assert any("do_sample" in gap for gap in health["engine"]["ignores"])
    assert health["engine"]["fallback_reason"] is None
    # The engine check sees this stack's worker, the one running the stand-in.
    engine_check = health["checks"]["engine"]
    assert engine_check["status"] == "up", engine_check
    assert "engine indextts2" in engine_check["detail"]


# --- emotion control ---------------------------------------------------------------------------------


def test_method_0_uses_no_emotion_reference(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    call = synthesize(indextts_stack, index_api, receiver, "Emotion from the speaker.", emo_control_method=0)
    assert call["emo_audio_prompt"] is None
    assert call["emo_vector"] is None
    assert call["use_emo_text"] is False
    assert call["verbose"] is False


def test_method_1_without_emotion_audio_uses_speaker(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    call = synthesize(
        indextts_stack, index_api, receiver, "Emotion from the voice itself.", emo_control_method=1, emo_weight=0.4
    )
    assert call["emo_audio_prompt"] == call["spk_audio_prompt"]
    assert call["emo_alpha"] == 0.4
    assert call["emo_vector"] is None
    assert call["use_emo_text"] is False


def test_method_1_with_emotion_audio(
    indextts_stack: IndexStack,
    index_api: httpx.Client,
    receiver: WebhookReceiver,
    prompt_dir: Path,
    emotion_prompt: str,
) -> None:
    call = synthesize(
        indextts_stack,
        index_api,
        receiver,
        "Emotion from another recording.",
        emo_control_method=1,
        emo_audio_prompt=emotion_prompt,
        emo_weight=0.9,
    )
    assert call["emo_audio_prompt"] != call["spk_audio_prompt"]
    # Each is the content-addressed copy of its own source file.
    assert Path(call["emo_audio_prompt"]).name == f"{sha256_of(prompt_dir / emotion_prompt)}.wav"
    assert Path(call["spk_audio_prompt"]).name == f"{sha256_of(prompt_dir / 'example.wav')}.wav"
    assert call["emo_alpha"] == 0.9


def test_method_2_passes_normalized_vector(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    vector = [0.5, 0.3, 0.0, 0.1, 0.0, 0.2, 0.4, 0.6]
    text = unique_text("Emotion from vectors.")
    params = {f"vec{i}": value for i, value in enumerate(vector, start=1)}
    task_uuid = submit(index_api, receiver, "example.wav", text, emo_control_method=2, emo_weight=0.7, **params)
    payload = await_webhook(indextts_stack, receiver, task_uuid)
    assert payload["status"] == "success", payload
    records, index = indextts_stack.infer_index(text)
    # One worker, one task at a time: the normalization for this task is the call just before.
    normalize = records[index - 1]
    assert normalize["call"] == "normalize_emo_vec"
    assert normalize["emo_vector"] == vector
    assert normalize["apply_bias"] is True
    call = records[index]
    assert call["emo_vector"] == normalize["result"]
    assert sum(call["emo_vector"]) == pytest.approx(0.8)  # the sum was capped, so it really is normalized
    assert call["emo_alpha"] == 0.7
    assert call["use_emo_text"] is False
    assert call["emo_audio_prompt"] is None


def test_other_methods_do_not_normalize(indextts_stack: IndexStack) -> None:
    """normalize_emo_vec is called only for method 2 (one call per method-2 task so far)."""
    records = indextts_stack.records()
    normalizations = [i for i, r in enumerate(records) if r["call"] == "normalize_emo_vec"]
    for i in normalizations:
        assert records[i + 1]["call"] == "infer" and records[i + 1]["emo_vector"] == records[i]["result"]
    with_vector = [r for r in records if r["call"] == "infer" and r["emo_vector"] is not None]
    assert len(with_vector) == len(normalizations)


def test_method_3_emotion_text(indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver) -> None:
    call = synthesize(
        indextts_stack,
        index_api,
        receiver,
        "Emotion from a description.",
        emo_control_method=3,
        emo_text="calm, a bit sad",
    )
    assert call["use_emo_text"] is True
    assert call["emo_text"] == "calm, a bit sad"
    assert call["emo_vector"] is None
    assert call["emo_audio_prompt"] is None


def test_method_3_empty_emotion_text_means_none(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    # None makes the real model derive the emotion from the text to synthesize.
    call = synthesize(
        indextts_stack, index_api, receiver, "Emotion from the text itself.", emo_control_method=3, emo_text=""
    )
    assert call["use_emo_text"] is True
    assert call["emo_text"] is None


# --- generation parameters ---------------------------------------------------------------------------


def test_generation_parameters_reach_infer(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    call = synthesize(indextts_stack, index_api, receiver, "Every knob is passed on.", **GENERATION_PARAMS)
    sent = GENERATION_PARAMS
    not_generation = ("emo_random", "max_text_tokens_per_segment", "do_sample")
    generation = {key: sent[key] for key in sent if key not in not_generation}
    # Exactly these keyword arguments: an unknown one would reach the GPT's generate(). do_sample is
    # not passed: the real package pops it and always samples (/health lists it in "ignores").
    assert call["generation_kwargs"] == generation
    # The audio comes back as samples, written by the adapter (the package's own save needs torchcodec).
    assert call["output_path"] is None
    assert call["stream_return"] is False
    assert call["generation_kwargs_types"]["top_k"] == "int"
    assert call["generation_kwargs_types"]["max_mel_tokens"] == "int"
    assert call["generation_kwargs_types"]["num_beams"] == "int"
    assert call["use_random"] is True
    assert call["max_text_tokens_per_segment"] == 77
    assert call["max_text_tokens_per_segment_type"] == "int"


def test_top_k_zero_disables_top_k(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    call = synthesize(indextts_stack, index_api, receiver, "No top-k here.", top_k=0)
    assert "top_k" in call["generation_kwargs"]
    assert call["generation_kwargs"]["top_k"] is None


def test_defaults_reach_infer(indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver) -> None:
    """No params at all: the spec's defaults (method 1 with the speaker's own audio)."""
    call = synthesize(indextts_stack, index_api, receiver, "All defaults.")
    assert call["emo_audio_prompt"] == call["spk_audio_prompt"]
    assert call["emo_alpha"] == 0.65
    assert call["use_random"] is False
    assert call["max_text_tokens_per_segment"] == 120
    assert call["generation_kwargs"] == {
        "top_p": 0.8,
        "top_k": 30,
        "temperature": 0.8,
        "length_penalty": 0.0,
        "num_beams": 3,
        "repetition_penalty": 10.0,
        "max_mel_tokens": 1500,
    }


# --- prompts -----------------------------------------------------------------------------------------


def test_speaker_prompts_are_content_addressed(
    indextts_stack: IndexStack,
    index_api: httpx.Client,
    receiver: WebhookReceiver,
    prompt_dir: Path,
    file_server: FileServer,
) -> None:
    # The real model caches one speaker keyed by the path string: same audio must mean same path,
    # different audio a different path.
    first = synthesize(indextts_stack, index_api, receiver, "Same voice, first time.", emo_control_method=0)
    second = synthesize(indextts_stack, index_api, receiver, "Same voice, second time.", emo_control_method=0)
    other = synthesize(indextts_stack, index_api, receiver, "Another voice.", prompt="tone.wav", emo_control_method=0)
    assert first["spk_audio_prompt"] == second["spk_audio_prompt"]
    assert other["spk_audio_prompt"] != first["spk_audio_prompt"]
    # The same bytes by URL land on the same path as from the prompt directory.
    shutil.copy(prompt_dir / "example.wav", file_server.root / "idx-voice.wav")
    by_url = synthesize(
        indextts_stack,
        index_api,
        receiver,
        "Same voice, by URL.",
        prompt=file_server.url("idx-voice.wav"),
        emo_control_method=0,
    )
    assert by_url["spk_audio_prompt"] == first["spk_audio_prompt"]


def test_registered_voice_keeps_one_path(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver, prompt_dir: Path
) -> None:
    """A registered voice reaches the model under one path, named by its id, task after task (so
    its speaker cache hits), as speaker and as emotion reference alike."""
    with (prompt_dir / "tone.wav").open("rb") as recording:
        registered = index_api.post("/voices", data={"name": "idx"}, files={"file": ("tone.wav", recording)})
    assert registered.status_code in (200, 201), registered.text
    voice = f"voice:{registered.json()['voice_id']}"
    first = synthesize(indextts_stack, index_api, receiver, "A voice, first.", prompt=voice, emo_control_method=0)
    second = synthesize(
        indextts_stack,
        index_api,
        receiver,
        "A voice, second.",
        prompt=voice,
        emo_control_method=1,
        emo_audio_prompt=voice,
    )
    assert first["spk_audio_prompt"] == second["spk_audio_prompt"] == second["emo_audio_prompt"]
    assert Path(first["spk_audio_prompt"]).name == f"voice-{registered.json()['voice_id']}.wav"


# --- failures ----------------------------------------------------------------------------------------


def test_interactive_request_streams_with_stream_return(indextts_stack: IndexStack) -> None:
    """POST /v1/audio/speech calls infer with stream_return=True and streams what it yields (the
    stand-in's 1.5 s, as OpenAI's 24 kHz pcm), with the same arguments as a batch task otherwise."""
    text = unique_text("interactive")
    body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}
    with indextts_stack.client() as client:
        response = client.post("/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/pcm"
    assert len(response.content) / 2 / 24000 == pytest.approx(1.5, abs=0.01)
    call = indextts_stack.infer_call(text)
    assert call["stream_return"] is True
    assert call["output_path"] is None
    assert call["spk_audio_prompt"].endswith(".wav")


def test_engine_exception_fails_only_that_task(
    indextts_stack: IndexStack, index_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    text = unique_text(f"This one breaks: {RAISE_MARKER}")
    task_uuid = submit(index_api, receiver, "example.wav", text)
    payload = await_webhook(indextts_stack, receiver, task_uuid)
    assert payload["status"] == "failed", payload
    assert "s3_url" not in payload
    assert "CUDA out of memory" in payload["error_message"]
    assert "RuntimeError" in payload["error_message"]
    indextts_stack.infer_call(text)  # it did reach the model
    # The worker goes on, with the same model instance: no restart, no second construction.
    synthesize(indextts_stack, index_api, receiver, "The next one works.")
    assert indextts_stack.tts_worker.alive()
    assert [r["call"] for r in indextts_stack.records()].count("__init__") == 1
