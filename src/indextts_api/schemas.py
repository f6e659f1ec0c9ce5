"""Request, response and message schemas. The names say their role:

``TaskCreate`` (POST /generate body), ``TaskQueued`` (its answer), ``TaskMessage`` (Kafka task
topic), ``ResultMessage`` (Kafka result topic), ``WebhookPayload`` (POST to the client's hook).
"""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from indextts_api.config import get_settings

MESSAGE_VERSION: Literal[1] = 1
MAX_URL_CHARS = 2048

UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


def check_http_url(value: str, what: str) -> str:
    """An absolute http(s) URL with a host, or ValueError naming ``what``."""
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"{what} is longer than {MAX_URL_CHARS} characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials")
    return value


def is_url(value: str) -> bool:
    return "://" in value


def check_audio_reference(value: str, what: str) -> str:
    """An http(s) URL, or a relative path that stays inside the prompt directory (checked syntactically)."""
    value = value.strip()
    if not value:
        raise ValueError(f"{what} must not be empty")
    if is_url(value) or value.lower().startswith(("file:", "data:")):
        return check_http_url(value, what)
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{what} contains a forbidden character")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError(f"{what} must be a URL or a path relative to the prompt directory")
    if ".." in path.parts:
        raise ValueError(f"{what} must not contain '..'")
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
        default=None, description="URL or prompt-directory path of the emotion reference audio (method 1)"
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

    @property
    def emotion_vector(self) -> list[float]:
        return [self.vec1, self.vec2, self.vec3, self.vec4, self.vec5, self.vec6, self.vec7, self.vec8]


class TaskCreate(BaseModel):
    """Body of POST /generate."""

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
                }
            ]
        },
    )

    spk_audio_prompt: str = Field(description="http(s) URL or path inside the prompt directory")
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
        if not value.strip():
            raise ValueError("text must not be empty")
        limit = get_settings().max_text_chars
        if len(value) > limit:
            raise ValueError(f"text is longer than {limit} characters")
        return value

    @field_validator("hook_url")
    @classmethod
    def _hook_is_http(cls, value: str) -> str:
        return check_http_url(value, "hook_url")


class TaskQueued(BaseModel):
    """Answer of POST /generate once the task is stored in the broker."""

    task_uuid: str
    status: Literal["queued"] = "queued"
    message: str = "Task has been queued for processing"


class ErrorPublic(BaseModel):
    error: str


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


class ResultMessage(BaseModel):
    """A finished synthesis on the result topic; the audio travels by reference (claim check)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = MESSAGE_VERSION
    task_uuid: str
    hook_url: str
    status: Literal["success", "failed"]
    audio: str | None = None
    error_message: str | None = None
    timestamp: float
    queued_at: float | None = None
    started_at: float | None = None  # when the TTS worker took the task
    engine: str | None = None
    fetch_s: float | None = None
    synthesis_s: float | None = None
    audio_s: float | None = None


class WebhookPayload(BaseModel):
    """Exactly the spec's webhook body (additive fields only)."""

    task_uuid: str
    status: Literal["success", "failed"]
    s3_url: str | None = None
    error_message: str | None = None
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def now() -> float:
    return time.time()
