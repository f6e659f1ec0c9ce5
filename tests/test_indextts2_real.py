"""The real ``indextts.infer_v2.IndexTTS2`` (``indextts2-inference``), from random checkpoints.

Only its trained weights are missing here: ``indextts_api.engines.indextts2_random`` builds, at
test time, a checkpoint set in the real architecture (small where the code allows) and the
auxiliary models in a local hub cache, which the real class loads offline. The engine runs in the
service's TTS worker, never in pytest's process. What this proves: the package installs and
imports on this host, loads a checkpoint set of the real layout, runs every emotion method and
the pipeline delivers its audio; the KV cache is used; bad checkpoint sets are reported, not
crash-looped. What it cannot: speed, memory and voice quality of the trained model (README).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from indextts_api.devtools import WebhookReceiver
from indextts_api.engines.indextts2 import REQUIRED_DIRS, REQUIRED_FILES
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.infra.process import ChildProcess
from tests.conftest import API_KEY, ROOT, Service, launch_service, own_topics, stop_service, wait_for_worker
from tests.test_indextts2_engine import submit

GENERATE_TIMEOUT_S = 240
# Import (~10 s), the text normaliser's first build (~60 s, once per session), construction and
# the warm-up synthesis (up to ~30 s the very first time: numba compiles librosa's kernels).
ENGINE_START_TIMEOUT_S = 360
WEBHOOK_TIMEOUT_S = 120
FAILED_START_TIMEOUT_S = 180
# Small, so that a random model's run is short and always the same length (its stop token is
# biased away: it generates exactly this many mel codes).
MAX_MEL_TOKENS = 12


@dataclass(frozen=True)
class RandomModel:
    model_dir: Path
    hub_cache: Path
    # Shared by every worker of the session: the normaliser's grammars are built once.
    engine_cache: Path

    def env(self) -> dict[str, str]:
        return {
            "MODEL_DIR": str(self.model_dir),
            "ENGINE_CACHE_DIR": str(self.engine_cache),
            # Where huggingface_hub looks for the auxiliary models, and never online.
            "HF_HUB_CACHE": str(self.hub_cache),
            "HF_HUB_OFFLINE": "1",
        }

    def variant(self, directory: Path, without: str, replace_with: bytes | None = None) -> RandomModel:
        """A copy of this checkpoint set (links) lacking ``without``, or with other bytes in its place."""
        directory.mkdir()
        for entry in self.model_dir.iterdir():
            if entry.name != without:
                (directory / entry.name).symlink_to(entry)
        if replace_with is not None:
            (directory / without).write_bytes(replace_with)
        return RandomModel(directory, self.hub_cache, self.engine_cache)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> RandomModel:
    base = tmp_path_factory.mktemp("indextts2-random")
    model = RandomModel(base / "checkpoints", base / "hub", base / "engine-cache")
    generated = subprocess.run(
        [sys.executable, "-m", "indextts_api.engines.indextts2_random", str(model.model_dir), str(model.hub_cache)],
        capture_output=True,
        text=True,
        timeout=GENERATE_TIMEOUT_S,
        check=False,
    )
    assert generated.returncode == 0, generated.stderr[-4000:]
    names = {entry.name for entry in model.model_dir.iterdir()}
    assert set(REQUIRED_FILES) | set(REQUIRED_DIRS) <= names
    return model


@pytest.fixture(scope="module")
def foreign_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A loadable torch checkpoint of another model, which a strict load_state_dict rejects (as it
    does IndexTTS-2.5's gpt.pth). Written by a subprocess: torch is not imported in pytest's."""
    path = tmp_path_factory.mktemp("foreign") / "gpt.pth"
    script = f"import torch; torch.save({{'layer.weight': torch.zeros(2, 2)}}, {str(path)!r})"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    return path.read_bytes()


@pytest.fixture(scope="module")
def real_service(
    tmp_path_factory: pytest.TempPathFactory, infra: EmbeddedInfra, prompt_dir: Path, random_model: RandomModel
) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("indextts2-real-service")
    service = launch_service(
        workdir,
        infra,
        prompt_dir,
        "--engine",
        "indextts2",
        "--device",
        "cpu",
        start_timeout_s=ENGINE_START_TIMEOUT_S,
        **random_model.env(),
        **own_topics("idxreal"),
    )
    yield service
    stop_service(service)


def read_wav(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """(rate, channels, bytes per sample, samples), decoded by the standard library's own reader."""
    with wave.open(io.BytesIO(data)) as reader:
        frames = reader.readframes(reader.getnframes())
        return reader.getframerate(), reader.getnchannels(), reader.getsampwidth(), np.frombuffer(frames, "<i2")


def submit_task(service: Service, receiver: WebhookReceiver, **params: Any) -> str:
    text = f"Hello world, this is a test. {uuid.uuid4().hex[:6]}"
    with service.client() as client:
        return submit(client, receiver, "example.wav", text, max_mel_tokens=MAX_MEL_TOKENS, **params)


def await_webhook(service: Service, receiver: WebhookReceiver, task_uuid: str) -> dict[str, Any]:
    deadline = time.monotonic() + WEBHOOK_TIMEOUT_S
    while True:
        try:
            payload: dict[str, Any] = receiver.wait_for(task_uuid, timeout_s=1.0)[0].payload
            return payload
        except TimeoutError:
            if not service.process.alive() or time.monotonic() > deadline:
                pytest.fail(f"no webhook for {task_uuid}:\n{service.process.log_tail(6000)}")


# --- the real class through the pipeline ----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"emo_control_method": 0}, id="method-0-speaker"),
        pytest.param({"emo_control_method": 1, "emo_weight": 0.5}, id="method-1-reference-audio"),
        pytest.param(
            {"emo_control_method": 2, "vec1": 0.6, "vec4": 0.3, "emo_weight": 0.8}, id="method-2-emotion-vector"
        ),
        pytest.param({"emo_control_method": 3, "emo_text": "calm and a little sad"}, id="method-3-emotion-text"),
    ],
)
def test_emotion_methods_deliver_22050_hz_wav(
    real_service: Service, receiver: WebhookReceiver, params: dict[str, Any]
) -> None:
    task_uuid = submit_task(real_service, receiver, **params)
    payload = await_webhook(real_service, receiver, task_uuid)
    assert payload["status"] == "success", payload
    audio = httpx.get(payload["s3_url"], timeout=30)
    assert audio.status_code == 200
    rate, channels, width, samples = read_wav(audio.content)
    assert (rate, channels, width) == (22050, 1, 2)
    assert samples.size > 0 and np.abs(samples).max() > 0  # audio, not an empty or silent file
    with real_service.client() as client:
        status = client.get(f"/tasks/{task_uuid}").json()
    assert status["engine"] == "indextts2", status


def test_interactive_speech_streams_the_real_class_segment_by_segment(real_service: Service) -> None:
    """POST /v1/audio/speech with the real class: infer(stream_return=True) yields each text
    segment's audio, which reaches the openai SDK's stream before the synthesis ends."""
    import openai

    text = "Hello world, this is the first part. And here is the second part of it."
    arrivals: list[tuple[float, int]] = []
    with openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key=API_KEY, timeout=300, max_retries=0) as sdk:
        started = time.monotonic()
        with sdk.audio.speech.with_streaming_response.create(
            model="indextts2",
            voice="alloy",  # OPENAI_DEFAULT_VOICE: the example voice
            input=text,
            response_format="pcm",
            extra_body={"params": {"max_mel_tokens": MAX_MEL_TOKENS, "max_text_tokens_per_segment": 12}},
        ) as response:
            task_uuid = response.headers["x-task-id"]
            for chunk in response.iter_bytes():
                arrivals.append((time.monotonic() - started, len(chunk)))
    samples = sum(size for _, size in arrivals) // 2
    assert samples > 0
    with real_service.client() as client:
        deadline = time.monotonic() + WEBHOOK_TIMEOUT_S
        while (status := client.get(f"/tasks/{task_uuid}").json())["status"] != "success":
            assert time.monotonic() < deadline and status["status"] not in ("failed", "canceled"), status
            time.sleep(0.5)
    assert status["engine"] == "indextts2"
    # Every segment and the silences between them, resampled to OpenAI's 24 kHz.
    assert abs(samples / 24000 - status["timings"]["audio_s"]) < 0.05, (samples, status["timings"])
    # Several segments: the first audio came well before the last.
    assert arrivals[-1][0] - arrivals[0][0] > 0.2, arrivals


def test_health_reports_indextts2(real_service: Service) -> None:
    health = httpx.get(f"{real_service.base_url}/health", timeout=10).json()
    assert health["status"] == "healthy", health
    assert health["engine"]["name"] == "indextts2"
    assert health["engine"]["fallback_reason"] is None
    assert "engine indextts2" in health["checks"]["engine"]["detail"]


def test_normaliser_grammars_built_in_the_cache_dir(real_service: Service, random_model: RandomModel) -> None:
    """The one-time build went to ENGINE_CACHE_DIR (writable, shared), not into the installed package."""
    grammars = sorted(path.name for path in random_model.engine_cache.glob("*.far"))
    assert any(name.startswith("en_") for name in grammars), grammars
    assert any(name.startswith("zh_") for name in grammars), grammars  # language auto: both


def test_generation_uses_the_kv_cache(random_model: RandomModel, prompt_dir: Path, tmp_path: Path) -> None:
    """After the first decoding step, each step gives the GPT one new position: a transformers
    release that stops passing the cache (5.24 on) would make every step recompute everything."""
    probe = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "kv_cache_probe.py"),
            str(random_model.model_dir),
            str(random_model.engine_cache),
            str(prompt_dir / "example.wav"),
            str(tmp_path / "probe.wav"),
            "24",
        ],
        env={**os.environ, **random_model.env()},
        capture_output=True,
        text=True,
        timeout=FAILED_START_TIMEOUT_S,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    positions = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(positions) >= 20, positions  # one forward per mel code
    assert positions[0] > 1, positions  # the conditioning prompt, once
    assert positions[1:] == [1] * (len(positions) - 1), positions


def test_readme_prefetch_commands_resolve_offline(random_model: RandomModel, tmp_path: Path) -> None:
    """The README's `hf download` lines for the auxiliary models work with the huggingface_hub the
    extra installs: offline, against a hub cache holding them, each resolves to its files."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.split("#")[0].split() for line in readme.splitlines() if line.startswith("hf download ")]
    assert commands[0][:3] == ["hf", "download", "IndexTeam/IndexTTS-2"], commands
    auxiliary = commands[1:]
    assert {command[2] for command in auxiliary} == {
        "facebook/w2v-bert-2.0",
        "amphion/MaskGCT",
        "funasr/campplus",
        "nvidia/bigvgan_v2_22khz_80band_256x",
    }
    hf = Path(sys.executable).parent / "hf"
    env = {**os.environ, **random_model.env(), "HF_HUB_DISABLE_UPDATE_CHECK": "1", "NO_COLOR": "1"}
    for command in auxiliary:
        ran = subprocess.run(
            [str(hf), *command[1:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
        assert str(random_model.hub_cache) in ran.stdout + ran.stderr, (command, ran.stdout, ran.stderr)


# --- checkpoint sets that cannot work ----------------------------------------------------------------


def test_auto_falls_back_to_piper_naming_the_missing_file(
    tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, random_model: RandomModel
) -> None:
    incomplete = random_model.variant(tmp_path / "no-feat1", without="feat1.pt")
    service = launch_service(
        tmp_path, infra, prompt_dir, "--engine", "auto", **incomplete.env(), **own_topics("idxnofeat")
    )
    try:
        health = httpx.get(f"{service.base_url}/health", timeout=10).json()
        assert health["engine"]["name"] == "piper", health
        assert "feat1.pt" in health["engine"]["fallback_reason"]
        assert "feat1.pt" in service.process.log_tail(20000)  # the banner says it too
    finally:
        stop_service(service)


def test_auto_falls_back_to_piper_when_construction_fails(
    tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, random_model: RandomModel, foreign_checkpoint: bytes
) -> None:
    broken = random_model.variant(tmp_path / "broken-gpt", without="gpt.pth", replace_with=foreign_checkpoint)
    service = launch_service(
        tmp_path,
        infra,
        prompt_dir,
        "--engine",
        "auto",
        start_timeout_s=FAILED_START_TIMEOUT_S,
        **broken.env(),
        **own_topics("idxautobroken"),
    )
    try:
        health = httpx.get(f"{service.base_url}/health", timeout=10).json()
        assert health["engine"]["name"] == "piper", health
        reason = health["engine"]["fallback_reason"]
        assert "could not load the checkpoints" in reason and "RuntimeError" in reason, reason
    finally:
        stop_service(service)


def test_broken_gpt_checkpoint_stops_the_service_without_restarts(
    tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, random_model: RandomModel, foreign_checkpoint: bytes
) -> None:
    """--engine indextts2 with a gpt.pth of another model: the worker exits 78 with the cause, and
    `all` stops instead of restarting it in a loop."""
    broken = random_model.variant(tmp_path / "broken-gpt", without="gpt.pth", replace_with=foreign_checkpoint)
    process = _start_all(tmp_path, infra, prompt_dir, broken, "idxbroken")
    try:
        code = process.proc.wait(timeout=FAILED_START_TIMEOUT_S)
    finally:
        process.stop()
    log = process.log_tail(30000)
    assert code == 1, log
    assert "could not load the checkpoints" in log and "RuntimeError" in log, log
    assert "tts-worker-0 cannot run with this configuration; stopping the service" in log
    assert "restarting in" not in log


def test_sigterm_stops_all_while_the_engine_loads(
    tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, random_model: RandomModel
) -> None:
    process = _start_all(tmp_path, infra, prompt_dir, random_model, "idxsigterm")
    try:
        worker = wait_for_worker(process.pid, "tts-worker", timeout_s=60)
        time.sleep(3)  # importing torch and the package: seconds from being ready to take tasks
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        code = process.proc.wait(timeout=20)
        stopped_in = time.monotonic() - started
    finally:
        process.stop()
    assert code == 0, process.log_tail(6000)
    assert stopped_in < 15, stopped_in
    assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)


def _start_all(tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, model: RandomModel, name: str) -> ChildProcess:
    """`all --engine indextts2` without waiting for it to become healthy."""
    from indextts_api.infra.process import child_env, free_port
    from tests.conftest import API_PASSWORD, API_USER

    env = child_env(
        {
            **infra.settings_env(),
            "API_USERNAME": API_USER,
            "API_PASSWORD": API_PASSWORD,
            "DATA_DIR": str(tmp_path / "data"),
            "PROMPT_DIR": str(prompt_dir),
            **model.env(),
            **own_topics(name),
        }
    )
    argv = [sys.executable, "-m", "indextts_api", "all", "--engine", "indextts2", "--port", str(free_port())]
    return ChildProcess(name, argv, tmp_path / f"{name}.log", env=env, cwd=tmp_path)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
