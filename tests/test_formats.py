"""Output formats: every response_format and two sample rates, encoded by the upload worker and
checked with an independent decoder (FFmpeg's, through PyAV), against the engine's own output."""

from __future__ import annotations

import io
import statistics
import struct
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.audio_formats import FORMATS, AudioOutput, encode
from indextts_api.devtools import WebhookReceiver
from tests.test_pipeline import TEXT, WEBHOOK_TIMEOUT_S

# What FFmpeg is told to read a headerless format as.
_RAW_DEMUXERS = {"pcm": "s16le", "mulaw": "mulaw"}


def decode(data: bytes, response_format: str, sample_rate: int | None = None) -> tuple[np.ndarray, int, int, Any]:
    """``data`` decoded by FFmpeg: (mono samples, decoded rate, channels, the audio stream)."""
    options: dict[str, str] = {}
    demuxer = _RAW_DEMUXERS.get(response_format)
    if demuxer:
        options = {"sample_rate": str(sample_rate), "ch_layout": "mono"}
    with av.open(io.BytesIO(data), format=demuxer, options=options) as container:
        stream = container.streams.audio[0]
        # Mono (the tests assert it): a frame's samples in order, planar or packed alike.
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        return samples, stream.codec_context.sample_rate, stream.codec_context.channels, stream


def opus_input_rate(data: bytes) -> int:
    """The input sample rate an Ogg Opus stream declares (its OpusHead, RFC 7845 section 5.1).
    FFmpeg always decodes Opus at 48 kHz; this is the rate the encoder was given."""
    head = data.index(b"OpusHead")
    return int(struct.unpack_from("<I", data, head + 12)[0])


def assert_same_length(decoded_s: float, engine_s: float, response_format: str) -> None:
    """Lossless formats keep every sample; MP3 and Opus pad to whole codec frames (plus the
    encoder's delay), which the decoder may not trim: never shorter, at most a few frames longer."""
    if FORMATS[response_format].bitrates is None:
        assert abs(decoded_s - engine_s) < 0.01, (response_format, decoded_s, engine_s)
    else:
        assert -0.01 < decoded_s - engine_s < 0.12, (response_format, decoded_s, engine_s)


def delivered_rate(data: bytes, response_format: str, decoded_rate: int) -> int:
    return opus_input_rate(data) if response_format == "opus" else decoded_rate


@pytest.fixture(scope="module")
def engine_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2.5 s WAV as an engine writes it (22,050 Hz, mono, 16-bit): a tone with an envelope."""
    path = tmp_path_factory.mktemp("formats") / "engine.wav"
    t = np.arange(int(2.5 * 22050)) / 22050
    signal = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    soundfile.write(path, signal.astype(np.float32), 22050, subtype="PCM_16")
    return path


CASES = [
    ({"response_format": "wav", "sample_rate": 16000}, 16000, None),
    ({"response_format": "mp3"}, 22050, 64),
    ({"response_format": "mp3", "sample_rate": 44100, "bitrate": 128}, 44100, 128),
    ({"response_format": "mp3", "sample_rate": 16000, "bitrate": 32}, 16000, 32),
    ({"response_format": "opus"}, 24000, 32),
    ({"response_format": "opus", "sample_rate": 48000, "bitrate": 96}, 48000, 96),
    ({"response_format": "flac"}, 22050, None),
    ({"response_format": "flac", "sample_rate": 8000}, 8000, None),
    ({"response_format": "pcm"}, 22050, None),
    ({"response_format": "pcm", "sample_rate": 24000}, 24000, None),
    ({"response_format": "mulaw"}, 8000, None),
]


@pytest.mark.parametrize(("asked", "rate", "kbps"), CASES, ids=[str(case[0]) for case in CASES])
def test_encoder_output_decodes_independently(
    engine_wav: Path, tmp_path: Path, asked: dict[str, Any], rate: int, kbps: int | None
) -> None:
    output = AudioOutput(**asked)
    target = tmp_path / f"out.{output.spec.extension}"
    encoded = encode(engine_wav, target, output)
    data = target.read_bytes()
    assert encoded.bytes == len(data)
    assert encoded.sample_rate == rate and encoded.bitrate_kbps == kbps
    assert encoded.content_type == FORMATS[output.response_format].content_type
    samples, decoded_rate, channels, stream = decode(data, output.response_format, rate)
    assert channels == 1
    assert delivered_rate(data, output.response_format, decoded_rate) == rate
    assert_same_length(len(samples) / decoded_rate, 2.5, output.response_format)
    assert abs(encoded.duration_s - 2.5) < 0.01
    # Not silence, not noise: the 220 Hz tone survives every codec (its strongest frequency).
    spectrum = np.abs(np.fft.rfft(samples[: decoded_rate * 2].astype(np.float64)))
    peak_hz = np.argmax(spectrum) * decoded_rate / (2 * len(spectrum) - 2)
    assert abs(peak_hz - 220) < 5, peak_hz
    if kbps is not None:
        # The bitrate asked for: the size of the stream over its length (container overhead aside).
        measured = len(data) * 8 / 2.5 / 1000
        assert 0.8 * kbps < measured < 1.25 * kbps + 4, measured
        if output.response_format == "mp3":
            assert stream.bit_rate == kbps * 1000


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ({"response_format": "opus", "sample_rate": 22050}, "cannot be opus"),
        ({"response_format": "mulaw", "sample_rate": 16000}, "cannot be mulaw"),
        ({"response_format": "wav", "bitrate": 64}, "bitrate applies to mp3 and opus only"),
        ({"response_format": "mp3", "bitrate": 400}, "8 to 320 kbps"),
        ({"response_format": "mp3", "sample_rate": 22000}, "cannot be mp3"),
        ({"response_format": "aiff"}, "response_format"),
        ({"sample_rate": 96000}, "sample_rate"),
    ],
)
def test_generate_refuses_a_format_it_cannot_deliver(
    api: httpx.Client, receiver: WebhookReceiver, asked: dict[str, Any], message: str
) -> None:
    body = {"spk_audio_prompt": "example.wav", "text": "x", "hook_url": receiver.url("/never"), **asked}
    response = api.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


PIPELINE_CASES = [
    ("wav", None),
    ("wav", 16000),
    ("mp3", None),
    ("mp3", 44100),
    ("opus", None),
    ("flac", None),
    ("pcm", 24000),
    ("mulaw", None),
]


def test_every_format_through_the_pipeline(api: httpx.Client, receiver: WebhookReceiver) -> None:
    """Each format (two sample rates for wav and mp3) delivered by webhook, stored under its
    extension with its content type, described by GET /tasks, and decoded by FFmpeg to the length
    of the engine's own audio."""
    submitted: dict[str, tuple[str, int | None]] = {}
    for response_format, sample_rate in PIPELINE_CASES:
        body: dict[str, Any] = {
            "spk_audio_prompt": "example.wav",
            "text": "Every format plays.",
            "hook_url": receiver.url("/formats"),
            "response_format": response_format,
        }
        if sample_rate:
            body["sample_rate"] = sample_rate
        answer = api.post("/generate", json=body)
        assert answer.status_code == 200, answer.text
        submitted[answer.json()["task_uuid"]] = (response_format, sample_rate)
    for task_uuid, (response_format, sample_rate) in submitted.items():
        [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
        payload = hook.payload
        assert payload["status"] == "success", payload
        spec = FORMATS[response_format]
        assert f"/{task_uuid}.{spec.extension}" in payload["s3_url"]
        task = api.get(f"/tasks/{task_uuid}").json()
        described = {key: value for key, value in task["audio"].items() if value is not None}
        engine_seconds = task["timings"]["audio_s"]
        expected_rate = sample_rate or {"opus": 24000, "mulaw": 8000}.get(response_format, 22050)
        if response_format == "wav" and sample_rate is None:
            # The spec's default: the webhook body is exactly the spec's, the WAV stored as it came.
            assert "audio" not in payload
            assert described == {"response_format": "wav", "content_type": "audio/wav", "channels": 1}
        else:
            assert payload["audio"]["response_format"] == response_format
            assert payload["audio"]["sample_rate"] == expected_rate
            assert described == payload["audio"]
        stored = httpx.get(payload["s3_url"], timeout=30)
        assert stored.status_code == 200
        assert stored.headers["content-type"] == spec.content_type
        samples, decoded_rate, channels, _ = decode(stored.content, response_format, expected_rate)
        assert channels == 1
        assert delivered_rate(stored.content, response_format, decoded_rate) == expected_rate
        assert_same_length(len(samples) / decoded_rate, engine_seconds, response_format)
        assert np.abs(samples.astype(np.float64)).max() > 0.01 * (32768 if samples.dtype == np.int16 else 1)


def test_mp3_does_not_slow_the_tts_worker(api: httpx.Client, receiver: WebhookReceiver) -> None:
    """Encoding happens in the upload worker: the engine's time per task is the same whether the
    client asked for WAV or MP3 (same text, same voice, interleaved so load affects both alike)."""
    seconds: dict[str, list[float]] = {"wav": [], "mp3": []}
    ids: list[tuple[str, str]] = []
    for _ in range(4):
        for response_format in ("wav", "mp3"):
            body = {
                "spk_audio_prompt": "example.wav",
                "text": TEXT,
                "hook_url": receiver.url("/mp3-timing"),
                "response_format": response_format,
            }
            answer = api.post("/generate", json=body)
            assert answer.status_code == 200, answer.text
            ids.append((answer.json()["task_uuid"], response_format))
    for task_uuid, response_format in ids:
        [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
        assert hook.payload["status"] == "success", hook.payload
        timings = api.get(f"/tasks/{task_uuid}").json()["timings"]
        seconds[response_format].append(timings["synthesis_s"])
    wav, mp3 = statistics.median(seconds["wav"]), statistics.median(seconds["mp3"])
    assert mp3 < 1.5 * wav + 0.05, seconds
