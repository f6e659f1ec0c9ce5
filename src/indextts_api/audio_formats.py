"""Output formats: what a client may ask for (``response_format``, ``sample_rate``, ``bitrate``),
and the encoder that turns the engine's WAV into it.

Encoding runs in the upload worker, never in the TTS worker: the engine (a GPU in production)
must not wait for an encoder. libsndfile (through soundfile) writes every format here, MP3 with
LAME and Opus with libopus; soxr resamples. Both work block by block, so memory stays at one
block whatever the length of the audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import soundfile
import soxr
from pydantic import BaseModel, ConfigDict, Field, model_validator

ResponseFormat = Literal["wav", "mp3", "opus", "flac", "pcm", "mulaw"]
MIN_OUTPUT_RATE = 8_000
MAX_OUTPUT_RATE = 48_000
_BLOCK_FRAMES = 64 * 1024
# The MPEG version (hence the highest bitrate LAME can write) follows from the sample rate.
_MP3_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
_OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)


@dataclass(frozen=True)
class FormatSpec:
    """One response format: how it is stored and encoded, and what it allows."""

    extension: str
    content_type: str
    container: str  # libsndfile's major format
    subtype: str
    # Sample rates the codec can encode (None: any from MIN_OUTPUT_RATE to MAX_OUTPUT_RATE).
    rates: tuple[int, ...] | None = None
    # kbps a client may ask for, and what it gets when it does not (lossy formats only).
    bitrates: tuple[int, int] | None = None
    default_bitrate: int | None = None


FORMATS: dict[str, FormatSpec] = {
    "wav": FormatSpec("wav", "audio/wav", "WAV", "PCM_16"),
    "mp3": FormatSpec("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", _MP3_RATES, (8, 320), 64),
    "opus": FormatSpec("opus", "audio/ogg; codecs=opus", "OGG", "OPUS", _OPUS_RATES, (6, 256), 32),
    "flac": FormatSpec("flac", "audio/flac", "FLAC", "PCM_16"),
    # Raw 16-bit little-endian samples, mono (OpenAI's pcm); the rate is in the task record.
    "pcm": FormatSpec("pcm", "audio/pcm", "RAW", "PCM_16"),
    # Raw G.711 mu-law at 8 kHz, mono: what telephony stacks (Twilio, SIP) play; audio/basic is
    # exactly this (RFC 2046).
    "mulaw": FormatSpec("ulaw", "audio/basic", "RAW", "ULAW", (8_000,)),
}


class AudioOutput(BaseModel):
    """What the client asked the audio to be; the defaults keep the spec's behaviour (the
    engine's own WAV, stored as it came)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    response_format: ResponseFormat = Field(
        default="wav", description="wav (default), mp3, opus (Ogg), flac, pcm (raw s16le) or mulaw (raw, 8 kHz)"
    )
    sample_rate: int | None = Field(
        default=None,
        ge=MIN_OUTPUT_RATE,
        le=MAX_OUTPUT_RATE,
        description="Hz; default the engine's own (opus: the next rate Opus encodes; mulaw: 8000)",
    )
    bitrate: int | None = Field(default=None, gt=0, description="kbps, mp3 (8-320) and opus (6-256) only")

    @model_validator(mode="after")
    def _fits_the_format(self) -> AudioOutput:
        spec = FORMATS[self.response_format]
        if self.sample_rate is not None and spec.rates is not None and self.sample_rate not in spec.rates:
            allowed = ", ".join(str(rate) for rate in spec.rates)
            raise ValueError(f"sample_rate {self.sample_rate} cannot be {self.response_format} (allowed: {allowed})")
        if self.bitrate is not None:
            if spec.bitrates is None:
                raise ValueError(f"bitrate applies to mp3 and opus only, not {self.response_format}")
            low, high = spec.bitrates
            if not low <= self.bitrate <= high:
                raise ValueError(f"bitrate for {self.response_format} is {low} to {high} kbps")
        return self

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.response_format]

    @property
    def is_default(self) -> bool:
        return self.response_format == "wav" and self.sample_rate is None and self.bitrate is None

    def target_rate(self, source_rate: int) -> int:
        """The rate the audio is delivered at, for an engine that writes ``source_rate``."""
        if self.sample_rate is not None:
            return self.sample_rate
        rates = self.spec.rates
        if rates is None:
            return min(max(source_rate, MIN_OUTPUT_RATE), MAX_OUTPUT_RATE)
        return next((rate for rate in rates if rate >= source_rate), rates[-1])

    def needs_encoding(self, source_rate: int) -> bool:
        """Whether the engine's WAV must be converted (a plain WAV at its own rate is stored as is)."""
        return self.response_format != "wav" or self.target_rate(source_rate) != source_rate


class EncodedAudio(BaseModel):
    """What was delivered: recorded with the task and shown by GET /tasks/{id}. The engine's WAV
    stored as it came is not read again: its rate, duration and size are then left out."""

    response_format: ResponseFormat
    content_type: str
    sample_rate: int | None = None
    channels: int = 1
    duration_s: float | None = None
    bytes: int | None = None
    bitrate_kbps: int | None = None


# The bitrates each MPEG version defines (kbps); LAME writes one of them, the nearest asked.
_MPEG1_KBPS = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # 32-48 kHz
_MPEG2_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)  # 16-24 kHz
_MPEG25_KBPS = (8, 16, 24, 32, 40, 48, 56, 64)  # 8-12 kHz


def _mp3_bitrates(rate: int) -> tuple[int, ...]:
    return _MPEG1_KBPS if rate >= 32_000 else _MPEG2_KBPS if rate >= 16_000 else _MPEG25_KBPS


def _compression_level(output: AudioOutput, rate: int) -> tuple[float | None, int | None]:
    """libsndfile's compression level (0 best .. 1 smallest) giving the wanted bitrate, and that
    bitrate. libsndfile maps the level linearly onto the codec's range: MP3 (CBR) from the MPEG
    version's highest to its lowest bitrate, Opus from 256 to 6 kbps (read off its encoders, and
    checked by decoding in tests/test_formats.py). MP3 takes the nearest bitrate its version defines."""
    spec = output.spec
    if spec.default_bitrate is None:
        return None, None
    wanted = output.bitrate or spec.default_bitrate
    if output.response_format == "mp3":
        defined = _mp3_bitrates(rate)
        kbps = min(defined, key=lambda candidate: (abs(candidate - wanted), candidate))
        return (defined[-1] - kbps) / (defined[-1] - defined[0]), kbps
    return (256 - wanted) / 250, wanted


def describe_wav(source: Path) -> EncodedAudio:
    """The engine's WAV as delivered unchanged."""
    info = soundfile.info(str(source))
    return EncodedAudio(
        response_format="wav",
        content_type=FORMATS["wav"].content_type,
        sample_rate=info.samplerate,
        channels=info.channels,
        duration_s=round(info.frames / info.samplerate, 4),
        bytes=source.stat().st_size,
    )


def encode(source: Path, target: Path, output: AudioOutput) -> EncodedAudio:
    """``source`` (the engine's WAV) as ``output`` asks, written to ``target``."""
    spec = output.spec
    with soundfile.SoundFile(str(source)) as audio:
        source_rate, channels = audio.samplerate, audio.channels
        rate = output.target_rate(source_rate)
        level, kbps = _compression_level(output, rate)
        options: dict[str, object] = {"format": spec.container, "subtype": spec.subtype}
        if spec.container == "RAW":
            options["endian"] = "LITTLE"
        if level is not None:
            options["compression_level"] = level
        if output.response_format == "mp3":
            options["bitrate_mode"] = "CONSTANT"  # the size a client asked for, not a VBR guess
        resampler = None if rate == source_rate else soxr.ResampleStream(source_rate, rate, channels, dtype="float32")
        frames = 0
        with soundfile.SoundFile(str(target), "w", samplerate=rate, channels=channels, **options) as out:
            while True:
                block = audio.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                last = len(block) < _BLOCK_FRAMES
                if resampler is not None:
                    block = resampler.resample_chunk(block, last=last)
                if len(block):
                    out.write(np.clip(block, -1.0, 1.0))
                    frames += len(block)
                if last:
                    break
    return EncodedAudio(
        response_format=output.response_format,
        content_type=spec.content_type,
        sample_rate=rate,
        channels=channels,
        duration_s=round(frames / rate, 4),
        bytes=target.stat().st_size,
        bitrate_kbps=kbps,
    )


# --- Streamed output (POST /v1/audio/speech) ----------------------------------------------------
# OpenAI's audio is 24 kHz mono in every format; clients of its pcm assume that rate.
STREAM_RATE = 24_000
STREAM_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# FFmpeg's muxer and encoder per format, and the bitrate of the lossy ones (OpenAI's are close).
_STREAM_CODECS = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
    "wav": ("wav", "pcm_s16le", None),
}


class _Collect:
    """A write-only (so unseekable) sink for FFmpeg's muxer: it writes a stream as it goes, with the
    sizes a stream cannot know yet left open (a WAV's are 0xFFFFFFFF, as for a pipe)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class StreamEncoder:
    """Encodes audio that arrives in pieces (16-bit mono PCM at the engine's rate) into a byte
    stream of ``response_format`` at STREAM_RATE: ``feed`` returns the bytes ready so far,
    ``finish`` the rest. FFmpeg's encoders through PyAV (libmp3lame, libopus, its AAC and FLAC),
    soxr for the rate; a format is a stream, so pieces can be sent as they come."""

    def __init__(self, response_format: str, source_rate: int) -> None:
        self._format = response_format
        self._resampler = (
            None if source_rate == STREAM_RATE else soxr.ResampleStream(source_rate, STREAM_RATE, 1, dtype="int16")
        )
        self._container: Any = None
        if response_format != "pcm":
            import av  # only the API streams; workers need no FFmpeg

            muxer, codec, bit_rate = _STREAM_CODECS[response_format]
            self._sink = _Collect()
            # Ogg pages of 20 ms, not FFmpeg's default of one second: audio leaves as it is encoded.
            options = {"page_duration": "20000"} if muxer == "ogg" else {}
            self._container = av.open(self._sink, "w", format=muxer, options=options)
            self._stream = self._container.add_stream(codec, rate=STREAM_RATE, layout="mono")
            if bit_rate:
                self._stream.bit_rate = bit_rate
            self._frame_class = av.AudioFrame
        self.samples = 0

    def feed(self, samples: npt.NDArray[np.int16], last: bool = False) -> bytes:
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        samples = np.ascontiguousarray(samples, dtype="<i2")
        self.samples += len(samples)
        if self._container is None:
            return samples.tobytes()
        if len(samples):
            frame = self._frame_class.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = STREAM_RATE
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        tail = self.feed(np.zeros(0, dtype=np.int16), last=True)
        if self._container is None:
            return tail
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return tail + self._sink.take()
