"""Registered voices: a reference recording checked and stored once, then used as ``voice:<id>``.

A voice lives in the audio bucket under ``voices/<voice_id>/``: ``audio.wav`` (the normalised
recording: mono, 16-bit, at most VOICE_SAMPLE_RATE) and ``voice.json`` (its record), written in
that order, so a voice is listed only once its audio is stored. The id is content-addressed: the
SHA-256 of the decoded samples (16-bit mono at the source's rate), so the same audio gives the
same id on every host whatever container it came in, and registering it again changes nothing.
Every API and worker host already reaches the bucket: no other store is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile
import soxr
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from indextts_api.config import Settings
from indextts_api.prompts import PromptError, mono_blocks, open_audio
from indextts_api.schemas import check_unicode

logger = logging.getLogger(__name__)

# IndexTTS2 reads its references at 16 kHz (semantic features) and 22,050 Hz (mel); more is not
# used, and a lower rate keeps a voice's file small.
VOICE_SAMPLE_RATE = 22_050
# A recording quieter than this (RMS, dBFS) holds no voice to clone.
SILENCE_DBFS = -50.0
# Samples at full scale: more than this share of them means the recording was clipped.
CLIPPED_SHARE = 0.001
_FULL_SCALE = 32767 / 32768
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class VoiceRejected(ValueError):
    """The recording cannot be a voice; the message says why and is safe to show the client."""


class VoiceRecord(BaseModel):
    """A registered voice, as stored in ``voice.json`` and listed by GET /voices."""

    voice_id: str = Field(description="use it as spk_audio_prompt or emo_audio_prompt: voice:<voice_id>")
    name: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    duration_s: float
    sample_rate: int = Field(description="of the stored (normalised) audio")
    channels: int = 1
    bytes: int
    peak_dbfs: float
    rms_dbfs: float
    source: str = Field(description="upload, or the URL it was downloaded from")
    created_at: float


class VoicePublic(VoiceRecord):
    """GET /voices/{voice_id} and POST /voices: the record and a link to the stored audio."""

    audio_url: str = Field(description="presigned URL of the stored audio (WAV)")
    reference: str = Field(description="what to send in spk_audio_prompt: voice:<voice_id>")


class VoiceList(BaseModel):
    voices: list[VoiceRecord]
    next_after: str | None = Field(default=None, description="pass as ?after= for the next page")


class PreparedVoice(BaseModel):
    voice_id: str
    duration_s: float
    sample_rate: int
    bytes: int
    peak_dbfs: float
    rms_dbfs: float


def _dbfs(value: float) -> float:
    return round(20 * math.log10(value), 1) if value > 0 else -120.0


def prepare_voice(source: Path, target: Path, settings: Settings) -> PreparedVoice:
    """Decode ``source`` (any format the prompts accept), check it, and write the normalised voice
    to ``target``; VoiceRejected says what is wrong with a recording that cannot be a voice."""
    max_seconds = settings.voice_max_seconds
    try:
        audio = open_audio(source, "voice", max_seconds)
    except PromptError as exc:
        raise VoiceRejected(str(exc)) from None
    digest = hashlib.sha256()
    with audio:
        source_rate = audio.samplerate
        rate = min(source_rate, VOICE_SAMPLE_RATE)
        digest.update(f"{source_rate}:".encode())
        resampler = None if rate == source_rate else soxr.ResampleStream(source_rate, rate, 1, dtype="float32")
        frames = clipped = 0
        peak = energy = 0.0
        limit = max_seconds * source_rate
        with soundfile.SoundFile(str(target), "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as out:
            try:
                for block in mono_blocks(audio, "voice"):
                    frames += len(block)
                    if frames > limit:
                        raise VoiceRejected(f"voice is too long (at most {max_seconds:g} s)")
                    block = np.clip(block, -1.0, 1.0)
                    # Rounded to 16 bits: decoders of different containers give the same float within that.
                    digest.update(np.round(block * 32768).clip(-32768, 32767).astype("<i2").tobytes())
                    magnitude = np.abs(block)
                    peak = max(peak, float(magnitude.max(initial=0.0)))
                    energy += float(np.dot(block, block))
                    clipped += int(np.count_nonzero(magnitude >= _FULL_SCALE))
                    out.write(block if resampler is None else resampler.resample_chunk(block))
                if resampler is not None:
                    out.write(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            except PromptError as exc:
                raise VoiceRejected(str(exc)) from None
    seconds = frames / source_rate
    if seconds < settings.voice_min_seconds:
        raise VoiceRejected(f"voice is too short ({seconds:.2f} s; at least {settings.voice_min_seconds:g} s)")
    rms = math.sqrt(energy / frames)
    if _dbfs(rms) < SILENCE_DBFS:
        raise VoiceRejected(f"voice is silent (RMS {_dbfs(rms):.1f} dBFS; a voice is louder than {SILENCE_DBFS:g})")
    if clipped / frames > CLIPPED_SHARE:
        raise VoiceRejected(
            f"voice is clipped ({clipped / frames:.1%} of its samples at full scale): record it at a lower level"
        )
    return PreparedVoice(
        voice_id=digest.hexdigest()[:32],
        duration_s=round(seconds, 3),
        sample_rate=rate,
        bytes=target.stat().st_size,
        peak_dbfs=_dbfs(peak),
        rms_dbfs=_dbfs(rms),
    )


class VoiceStore:
    """Voices in the bucket. Thread-safe (boto3 clients are)."""

    def __init__(self, settings: Settings, s3_client: Any) -> None:
        self._settings = settings
        self._s3 = s3_client
        self.bucket = settings.bucket
        prefix = settings.s3_key_prefix.strip("/")
        self._prefix = f"{prefix}/voices/" if prefix else "voices/"

    def _key(self, voice_id: str, name: str) -> str:
        return f"{self._prefix}{voice_id}/{name}"

    def exists(self, voice_id: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(voice_id, "voice.json"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return False
            raise
        return True

    def get(self, voice_id: str) -> VoiceRecord | None:
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self._key(voice_id, "voice.json"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return None
            raise
        return VoiceRecord.model_validate_json(answer["Body"].read())

    def register(
        self, prepared: PreparedVoice, audio: Path, name: str, metadata: dict[str, Any], source: str
    ) -> tuple[VoiceRecord, bool]:
        """Store a prepared voice; returns its record and whether it is new. The same audio
        registered again (on any host) keeps its first record."""
        known = self.get(prepared.voice_id)
        if known is not None:
            return known, False
        record = VoiceRecord(
            **prepared.model_dump(), name=name, metadata=metadata, source=source, created_at=round(time.time(), 3)
        )
        with audio.open("rb") as body:
            self._s3.put_object(
                Bucket=self.bucket, Key=self._key(record.voice_id, "audio.wav"), Body=body, ContentType="audio/wav"
            )
        self._s3.put_object(
            Bucket=self.bucket,
            Key=self._key(record.voice_id, "voice.json"),
            Body=record.model_dump_json().encode(),
            ContentType="application/json",
        )
        logger.info("voice %s registered (%s, %.1f s)", record.voice_id, name, record.duration_s)
        return record, True

    def delete(self, voice_id: str) -> bool:
        """Remove the voice (its record first: from then on it is unknown everywhere); False if absent."""
        if not self.exists(voice_id):
            return False
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(voice_id, "voice.json"))
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(voice_id, "audio.wav"))
        logger.info("voice %s deleted", voice_id)
        return True

    def list(self, limit: int, after: str | None = None) -> VoiceList:
        """Voices in id order, ``limit`` at a time."""
        records: list[VoiceRecord] = []
        start_after = self._key(after, "~") if after else ""
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._prefix, StartAfter=start_after):
            for item in page.get("Contents", []):
                voice_id, _, leaf = item["Key"][len(self._prefix) :].partition("/")
                if leaf != "voice.json":
                    continue
                record = self.get(voice_id)  # None: deleted since the listing
                if record is not None:
                    records.append(record)
                if len(records) > limit:
                    return VoiceList(voices=records[:limit], next_after=records[limit - 1].voice_id)
        return VoiceList(voices=records)

    def download_audio(self, voice_id: str, sink: BinaryIO) -> bool:
        """Write the voice's stored audio to ``sink``; False if there is none."""
        try:
            self._s3.download_fileobj(self.bucket, self._key(voice_id, "audio.wav"), sink)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return False
            raise
        return True

    def audio_url(self, voice_id: str) -> str:
        return str(
            self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(voice_id, "audio.wav")},
                ExpiresIn=self._settings.s3_presign_expires_s,
            )
        )

    def public(self, record: VoiceRecord) -> VoicePublic:
        return VoicePublic(
            **record.model_dump(), audio_url=self.audio_url(record.voice_id), reference=f"voice:{record.voice_id}"
        )


class VoiceCheck:
    """Whether a voice exists, for POST /generate: a yes is remembered for ``ttl_s`` (a voice
    product sends the same few voices thousands of times), a no is asked again every time (a voice
    registered a moment ago works at once). A delete through this API host forgets at once; another
    host's delete is seen within ``ttl_s``, and the worker checks again before synthesis."""

    def __init__(self, voices: VoiceStore, ttl_s: float = 5.0, max_entries: int = 4096) -> None:
        self._voices = voices
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._seen: dict[str, float] = {}

    def exists(self, voice_id: str) -> bool:
        seen_at = self._seen.get(voice_id)
        if seen_at is not None and time.monotonic() - seen_at < self._ttl_s:
            return True
        if not self._voices.exists(voice_id):
            self._seen.pop(voice_id, None)
            return False
        if len(self._seen) >= self._max_entries:
            self._seen.clear()
        self._seen[voice_id] = time.monotonic()
        return True

    def forget(self, voice_id: str) -> None:
        self._seen.pop(voice_id, None)


def parse_metadata(text: str | None) -> dict[str, Any]:
    """The ``metadata`` form field: a JSON object (at most 4 KB), or VoiceRejected."""
    if not text:
        return {}
    if len(text) > 4096:
        raise VoiceRejected("metadata is longer than 4096 characters")
    try:
        value = json.loads(text)
    except ValueError:
        raise VoiceRejected("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise VoiceRejected("metadata must be a JSON object")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise VoiceRejected("metadata is not valid Unicode (a lone surrogate such as '\\ud800')") from None
    return value


def check_name(name: str) -> str:
    """A voice's name: 1 to 100 characters of valid Unicode, or VoiceRejected."""
    try:
        check_unicode(name, "name")
    except ValueError as exc:
        raise VoiceRejected(str(exc)) from None
    if not name.strip() or len(name) > 100:
        raise VoiceRejected("name must be 1 to 100 characters")
    return name.strip()
