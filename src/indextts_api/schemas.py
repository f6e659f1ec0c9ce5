"""Request, response and message schemas. The names say their role:

``TaskCreate`` (POST /generate body), ``TaskQueued`` (its answer), ``TaskMessage`` (Kafka task
topic), ``ResultMessage`` (Kafka result topic), ``WebhookPayload`` (POST to the client's hook).
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import idna
from pydantic import BaseModel, ConfigDict, Field, field_validator

from indextts_api.audio_formats import AudioOutput, EncodedAudio
from indextts_api.config import get_settings

MESSAGE_VERSION: Literal[1] = 1
MAX_URL_CHARS = 2048
# Local prompt paths: NAME_MAX of Linux file systems per component, and a total that stays far
# below PATH_MAX (4096 bytes) once the prompt directory is prepended.
MAX_PATH_COMPONENT_BYTES = 255
MAX_PROMPT_PATH_BYTES = 1024
MAX_HOST_CHARS = 253
MAX_LABEL_CHARS = 63

UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]

# Never part of a working URL, anywhere in it: C0 and C1 controls, DEL and whitespace (a client
# must percent-encode them). urlsplit silently drops tab, CR and LF, so without this check the URL
# stored could differ from the one a worker fetches, or a header could be split.
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
# A label a resolver can look up (hostnames are lowercased by urlsplit): letters, digits and hyphen,
# plus underscore, which real internal names use. RFC 3986 allows more in a host (sub-delims,
# %-escapes), but no such name can ever resolve.
_HOST_LABEL = re.compile(r"[a-z0-9_-]+")


def check_unicode(value: str, what: str) -> str:
    """``value`` if it is valid Unicode, or ValueError naming ``what``."""
    error = _unicode_error(value)
    if error:
        raise ValueError(f"{what} {error}")
    return value


def _unicode_error(value: str) -> str | None:
    """Where ``value`` holds a lone surrogate, or None. JSON's ``"\\ud800"`` decodes to one: Python
    holds it, but it cannot be encoded as UTF-8, so the task would fail when serialized for Kafka."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: lone surrogate {value[exc.start]!a} at character {exc.start}"
    return None


def _host_error(host: str) -> str | None:
    """Why ``host`` (as urlsplit gives it: lowercased, IPv6 without brackets) can never resolve, or None."""
    if ":" in host:
        return None  # an IPv6 literal: urlsplit and httpx validate it
    name = host.removesuffix(".")  # the root label of an absolute name
    if not name.isascii():
        try:
            name = idna.encode(name).decode("ascii")  # IDNA 2008, as httpx encodes it
        except UnicodeError as exc:  # idna.IDNAError is one
            return f"host {host!a} is not a valid internationalized domain name ({exc})"
    if len(name) > MAX_HOST_CHARS:
        return f"host is longer than {MAX_HOST_CHARS} characters"
    for label in name.split("."):
        if not label:
            return f"host {host!a} has an empty label"
        if len(label) > MAX_LABEL_CHARS:
            return f"host has a label longer than {MAX_LABEL_CHARS} characters"
        if not _HOST_LABEL.fullmatch(label):
            return f"host {host!a} has a character no host name can hold (letters, digits, '-' and '_' only)"
    return None


def check_http_url(value: str, what: str) -> str:
    """An absolute http(s) URL that the HTTP client can build and whose host could resolve, without
    credentials; else ValueError naming ``what``. The API checks at submission, the workers may again."""
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"{what} is longer than {MAX_URL_CHARS} characters")
    error = _url_error(value)
    if error:
        raise ValueError(f"{what} {error}")
    return value


# Building the URL as httpx does costs about 25 us (measured), and a POST /generate has up to three
# URLs; clients send the same few hook and voice URLs again and again, so verdicts are remembered
# (keys are at most MAX_URL_CHARS long: at most a few MB).
@functools.lru_cache(maxsize=1024)
def _url_error(value: str) -> str | None:
    """Why ``value`` is not a usable http(s) URL (to follow its field's name), or None."""
    unicode_error = _unicode_error(value)
    if unicode_error:
        return unicode_error
    forbidden = _URL_FORBIDDEN.search(value)
    if forbidden:
        return f"contains a control character or space ({forbidden.group()!a} at character {forbidden.start()})"
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError for a port that is not a number or is over 65535
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    if port == 0:
        return "has port 0 (ports are 1-65535)"
    host_error = _host_error(parts.hostname)
    if host_error:
        return host_error
    try:
        # What the workers' client will build, with rules of its own; reading the host decodes an
        # xn-- label, which raises idna.IDNAError (a ValueError) for one that is not valid punycode.
        httpx.URL(value).host  # noqa: B018
    except (httpx.InvalidURL, ValueError) as exc:
        return f"is not a URL the HTTP client accepts: {exc}"
    return None


def check_text(value: str, what: str) -> str:
    """Text to speak: valid Unicode, not blank, at most MAX_TEXT_CHARS; else ValueError naming ``what``."""
    check_unicode(value, what)
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    limit = get_settings().max_text_chars
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return value


def is_url(value: str) -> bool:
    return "://" in value


# A registered voice: ``voice:`` and its id (see voices.py), 32 lowercase hex digits.
VOICE_PREFIX = "voice:"
_VOICE_ID = re.compile(r"[0-9a-f]{32}")


def voice_id_of(reference: str) -> str | None:
    """The voice id of a ``voice:<id>`` reference, or None for a URL or a path."""
    return reference[len(VOICE_PREFIX) :] if reference.startswith(VOICE_PREFIX) else None


def check_voice_id(value: str, what: str) -> str:
    if not _VOICE_ID.fullmatch(value):
        raise ValueError(f"{what} is not a voice id (32 lowercase hexadecimal digits, as POST /voices answers)")
    return value


def check_audio_reference(value: str, what: str) -> str:
    """An http(s) URL, ``voice:<voice_id>`` (a registered voice), or a relative path that stays
    inside the prompt directory (checked syntactically).

    A path is also held to what every file system accepts, so that looking it up can only find the
    file or not: a component over NAME_MAX or a path near PATH_MAX would make the lookup raise.
    """
    value = value.strip()
    if not value:
        raise ValueError(f"{what} must not be empty")
    check_unicode(value, what)
    voice_id = voice_id_of(value)
    if voice_id is not None:
        check_voice_id(voice_id, what)
        return value
    if is_url(value) or value.lower().startswith(("file:", "data:")):
        return check_http_url(value, what)
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{what} contains a forbidden character")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError(f"{what} must be a URL or a path relative to the prompt directory")
    if ".." in path.parts:
        raise ValueError(f"{what} must not contain '..'")
    if len(value.encode()) > MAX_PROMPT_PATH_BYTES:
        raise ValueError(f"{what} is longer than {MAX_PROMPT_PATH_BYTES} bytes")
    if any(len(part.encode()) > MAX_PATH_COMPONENT_BYTES for part in path.parts):
        raise ValueError(f"{what} has a path component longer than {MAX_PATH_COMPONENT_BYTES} bytes")
    try:
        os.fsencode(value)  # fails only on a host whose file-system encoding is not UTF-8
    except UnicodeEncodeError:
        raise ValueError(f"{what} cannot be a file name in this host's file-system encoding") from None
    return value


class TaskParams(BaseModel):
    """Optional synthesis parameters (the spec's ``params`` object), with its ranges and defaults."""

    # Strict: a wrong type is an error, not silently coerced; a misspelt key is an error too.
    model_config = ConfigDict(extra="forbid", strict=True)

    # The original server defaults to 1: emotion from a reference audio, the speaker's own when none is given.
    emo_control_method: int = Field(
        default=1, ge=0, le=3, description="0 same as speaker, 1 emotion audio, 2 emotion vectors, 3 emotion text"
    )
    emo_audio_prompt: str | None = Field(
        default=None,
        description="URL, voice:<voice_id> or prompt-directory path of the emotion reference audio (method 1)",
    )
    emo_weight: float = Field(default=0.65, ge=0.0, le=1.0)
    emo_text: str | None = Field(default=None, max_length=1000, description="Emotion description (method 3)")
    emo_random: bool = False
    temperature: float = Field(default=0.8, ge=0.1, le=2.0)
    top_p: float = Field(default=0.8, ge=0.0, le=1.0)
    top_k: int = Field(default=30, ge=0, le=100, description="0 disables top-k")
    max_text_tokens_per_segment: int = Field(default=120, ge=1, le=600)
    do_sample: bool = True
    num_beams: int = Field(default=3, ge=1, le=10)
    repetition_penalty: float = Field(default=10.0, gt=0.0, le=100.0)
    length_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # IndexTTS2's GPT stops at 1815 mel tokens; more cannot be generated.
    max_mel_tokens: int = Field(default=1500, ge=1, le=1815)
    vec1: UnitFloat = Field(default=0.0, description="Joy (喜)")
    vec2: UnitFloat = Field(default=0.0, description="Anger (怒)")
    vec3: UnitFloat = Field(default=0.0, description="Sadness (哀)")
    vec4: UnitFloat = Field(default=0.0, description="Fear (惧)")
    vec5: UnitFloat = Field(default=0.0, description="Disgust (厌恶)")
    vec6: UnitFloat = Field(default=0.0, description="Depression (低落)")
    vec7: UnitFloat = Field(default=0.0, description="Surprise (惊喜)")
    vec8: UnitFloat = Field(default=0.0, description="Calm (平静)")

    @field_validator("emo_audio_prompt")
    @classmethod
    def _emo_prompt_reference(cls, value: str | None) -> str | None:
        return None if value is None else check_audio_reference(value, "emo_audio_prompt")

    @field_validator("emo_text")
    @classmethod
    def _emo_text_is_unicode(cls, value: str | None) -> str | None:
        return None if value is None else check_unicode(value, "emo_text")

    @property
    def emotion_vector(self) -> list[float]:
        return [self.vec1, self.vec2, self.vec3, self.vec4, self.vec5, self.vec6, self.vec7, self.vec8]


class TaskCreate(AudioOutput):
    """Body of POST /generate: the spec's fields, and the output format (AudioOutput's fields)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "spk_audio_prompt": "https://example.com/speaker_voice.wav",
                    "text": "Hello, this is a test of text-to-speech generation.",
                    "hook_url": "https://your-app.com/webhook/tts-complete",
                    "params": {"emo_control_method": 0, "temperature": 0.8},
                },
                {
                    "spk_audio_prompt": "voice:3f2a9c0e4b7d4e1a8c6b5d2f0e9a7c41",
                    "text": "A registered voice, delivered as MP3 at 24 kHz.",
                    "hook_url": "https://your-app.com/webhook/tts-complete",
                    "response_format": "mp3",
                    "sample_rate": 24000,
                    "bitrate": 64,
                },
            ]
        },
    )

    spk_audio_prompt: str = Field(
        description="http(s) URL, voice:<voice_id> of a registered voice, or path inside the prompt directory"
    )
    text: str = Field(description="Text to synthesize")
    hook_url: str = Field(description="Webhook URL for the completion notification")
    params: TaskParams = Field(default_factory=TaskParams)

    @field_validator("spk_audio_prompt")
    @classmethod
    def _speaker_reference(cls, value: str) -> str:
        return check_audio_reference(value, "spk_audio_prompt")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        return check_text(value, "text")

    @field_validator("hook_url")
    @classmethod
    def _hook_is_http(cls, value: str) -> str:
        return check_http_url(value, "hook_url")

    @property
    def output(self) -> AudioOutput:
        return AudioOutput.model_construct(
            response_format=self.response_format, sample_rate=self.sample_rate, bitrate=self.bitrate
        )


OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


class SpeechRequest(BaseModel):
    """Body of POST /v1/audio/speech: OpenAI's request, plus this service's ``params``."""

    # Fields OpenAI may add, or a client's own, are accepted and named in X-Ignored-Parameters.
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "indextts2", "input": "Hello! How can I help you today?", "voice": "alloy"},
                {
                    "model": "indextts2",
                    "input": "I can't believe it worked!",
                    "voice": "voice:a862079bb0e7d2e34a9d662ee71a4ae1",
                    "response_format": "opus",
                    "stream_format": "sse",
                    "params": {"emo_control_method": 2, "vec1": 0.8},
                },
            ]
        },
    )

    model: str = Field(description="any name (tts-1, gpt-4o-mini-tts, indextts2): this service has one model")
    input: str = Field(description="the text to speak")
    voice: str = Field(
        description="a registered voice (voice:<voice_id> or the bare id), or a name: OpenAI's names map "
        "to OPENAI_VOICES, else OPENAI_DEFAULT_VOICE"
    )
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        default="mp3", description="24 kHz mono, as OpenAI's (pcm: raw 16-bit little-endian)"
    )
    speed: float = Field(default=1.0, ge=0.25, le=4.0, description="accepted; said in X-Ignored-Parameters")
    instructions: str | None = Field(default=None, max_length=4096, description="accepted; said ignored")
    stream_format: Literal["audio", "sse"] = "audio"
    params: TaskParams = Field(default_factory=TaskParams, description="IndexTTS2's controls (POST /generate's)")

    @field_validator("input")
    @classmethod
    def _input_not_blank(cls, value: str) -> str:
        return check_text(value, "input")

    @field_validator("voice")
    @classmethod
    def _voice_not_blank(cls, value: str) -> str:
        check_unicode(value, "voice")
        if not value.strip():
            raise ValueError("voice must not be empty")
        return value.strip()


class TaskQueued(BaseModel):
    """Answer of POST /generate once the task is stored in the broker."""

    task_uuid: str
    status: Literal["queued"] = "queued"
    message: str = "Task has been queued for processing"


class ErrorPublic(BaseModel):
    error: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The error object of OpenAI's API, which the /v1 routes answer (its SDKs raise from it)."""

    error: OpenAIErrorDetail


class QueueOutcomeUnknown(BaseModel):
    """504: the task was sent to the broker but its verdict did not come in time."""

    error: str
    queued: Literal["unknown"] = "unknown"
    task_uuid: str = Field(description="the id the task has if it was stored (its webhook names it)")


class EngineInfo(BaseModel):
    name: str
    model_version: str
    ignores: list[str] = Field(default_factory=list, description="request features this engine cannot honour")
    fallback_reason: str | None = Field(
        default=None, description="with ENGINE=auto, why IndexTTS2 is not the engine (a missing file, a load error)"
    )


class CheckPublic(BaseModel):
    status: Literal["up", "down"]
    duration_ms: float
    detail: str | None = None


class HealthPublic(BaseModel):
    status: Literal["healthy", "unhealthy"]
    timestamp: int
    model_version: str
    engine: EngineInfo
    checks: dict[str, CheckPublic] = Field(default_factory=dict, description="kafka, s3 and engine")


class TaskMessage(BaseModel):
    """A queued task on the task topic (key = task_uuid)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = MESSAGE_VERSION
    task_uuid: str
    spk_audio_prompt: str
    text: str
    hook_url: str
    params: TaskParams
    timestamp: float
    output: AudioOutput = Field(default_factory=AudioOutput)  # absent in older messages: the engine's WAV
    # An interactive request (POST /v1/audio/speech): its audio goes to the reply topic segment by
    # segment as it is synthesized, and it has no webhook (hook_url is empty).
    interactive: bool = False
    # The API host waits for the outcome (Prefer: wait): the upload worker announces it on the reply topic.
    notify: bool = False


class ResultMessage(BaseModel):
    """A finished synthesis on the result topic; the audio travels by reference (claim check)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = MESSAGE_VERSION
    task_uuid: str
    hook_url: str
    status: Literal["success", "failed", "canceled"]
    audio: str | None = None
    error_message: str | None = None
    timestamp: float
    output: AudioOutput = Field(default_factory=AudioOutput)  # the task's, for the upload worker to encode
    notify: bool = False  # the task's: announce the outcome on the reply topic
    queued_at: float | None = None
    started_at: float | None = None  # when the TTS worker took the task
    engine: str | None = None
    fetch_s: float | None = None
    engine_wait_s: float | None = None  # waiting for the engine (an interactive task ahead, or a batch one)
    synthesis_s: float | None = None
    audio_s: float | None = None


class WebhookPayload(BaseModel):
    """Exactly the spec's webhook body (additive fields only)."""

    task_uuid: str
    status: Literal["success", "failed"]
    s3_url: str | None = None
    error_message: str | None = None
    timestamp: int
    # Additive, only for a task that asked for an output format: what was delivered.
    audio: EncodedAudio | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def now() -> float:
    return time.time()


def describe_validation_error(error: dict[str, Any]) -> str:
    """One line naming the field and the rule, e.g. ``params.temperature: Input should be ≤ 2``."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    kind = error.get("type", "")
    if kind == "missing":
        return f"{field}: required field is missing"
    if kind == "extra_forbidden":
        return f"{field}: unknown field"
    if kind == "json_invalid":
        return "body: not valid JSON"
    if kind == "string_unicode":  # pydantic's own check, which only some string fields (and keys) get
        return f"{field}: a string or key is not valid Unicode (a lone surrogate such as '\\ud800')"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{field}: {message}"
