"""The one typed settings object. Nothing else in the project reads the environment.

Every variable is documented in ``config.env.example``. Values come from the process
environment first, then from ``.env`` in the working directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineName = Literal["auto", "indextts2", "piper"]

# Placeholders from the spec's example configuration: never acceptable as real credentials.
PLACEHOLDER_SECRETS = frozenset({"your_password", "your_username", "changeme", "password", "secret"})


@dataclass(frozen=True)
class KafkaTuning:
    """The client settings that depend on the broker (``kafka.tuning`` picks the profile)."""

    profile: Literal["embedded", "kafka"]
    session_timeout_ms: int
    heartbeat_interval_ms: int
    fetch_wait_max_ms: int
    delivery_timeout_ms: int


# An operator's Kafka: Kafka's (and librdkafka's) own defaults. A 45 s session outlasts a group
# coordinator moving to another broker (~10 s when a broker dies: a 6 s session lost every
# partition in that time); a waiting fetch is answered as soon as data arrives, so 500 ms costs
# no latency and a fraction of the brokers' CPU of a 20 ms wait.
KAFKA_DEFAULTS = KafkaTuning(
    profile="kafka",
    session_timeout_ms=45_000,
    heartbeat_interval_ms=3_000,
    fetch_wait_max_ms=500,
    delivery_timeout_ms=30_000,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False)

    # --- API -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=7861, ge=0, le=65535)
    api_username: str | None = None
    api_password: SecretStr | None = None
    # Bearer keys (Authorization: Bearer <key>), comma-separated, accepted beside Basic auth: what
    # OpenAI-compatible clients send.
    api_keys: SecretStr | None = None
    # OpenAI voice names (alloy, echo, ...) mapped to this service's voices, comma-separated
    # name=reference pairs (a reference is voice:<voice_id>, a prompt path or a URL); a name not
    # listed speaks with OPENAI_DEFAULT_VOICE.
    openai_voices: str = ""
    openai_default_voice: str = "example.wav"
    # How long an interactive request waits for its next audio before it fails (a synthesis in
    # progress ahead of it, plus its own segment).
    interactive_timeout_s: float = Field(default=120.0, gt=0)
    max_text_chars: int = Field(default=10_000, gt=0)
    max_request_bytes: int = Field(default=256 * 1024, gt=0)

    # --- Kafka (spec names) -----------------------------------------------------------------
    kafka_bootstrap_servers: str | None = None
    kafka_task_topic: str = "tts_tasks"
    kafka_result_topic: str = "tts_results"
    # Interactive speech (POST /v1/audio/speech): its own task topic, which TTS workers serve
    # before the batch topic, and the topic the audio comes back on to the API hosts.
    kafka_interactive_topic: str = "tts_interactive"
    kafka_reply_topic: str = "tts_replies"
    kafka_dead_letter_topic: str = "tts_dead_letters"
    kafka_tts_consumer_group: str = "tts_workers"
    kafka_upload_consumer_group: str = "upload_workers"
    kafka_topic_partitions: int = Field(default=12, ge=1)
    # Empty: the cluster's own default (default.replication.factor; 1 for the embedded broker).
    kafka_replication_factor: int | None = Field(default=None, ge=1)
    # Client tuning: "embedded" (the Tansu broker this service starts), "kafka" (an operator's
    # cluster: Kafka's defaults), auto = embedded when KAFKA_BOOTSTRAP_SERVERS is unset.
    kafka_profile: Literal["auto", "embedded", "kafka"] = "auto"
    # Overrides of the profile's values (empty: the profile's).
    kafka_session_timeout_ms: int | None = Field(default=None, ge=1000)
    kafka_heartbeat_interval_ms: int | None = Field(default=None, ge=100)
    kafka_fetch_wait_max_ms: int | None = Field(default=None, ge=0)
    # How long a produce may wait for the broker's acknowledgement: longer than a broker failover.
    kafka_delivery_timeout_ms: int = Field(default=30_000, ge=1000)
    kafka_security_protocol: str | None = None  # e.g. SASL_SSL for MSK / Confluent Cloud
    kafka_sasl_mechanism: str | None = None  # e.g. PLAIN, SCRAM-SHA-512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    # --- S3 (spec names) --------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket_name: str | None = None
    s3_region: str = "us-east-1"
    s3_public_url: str | None = None
    s3_key_prefix: str = ""
    s3_presign: bool | None = None  # None: presigned URLs for the embedded S3 (private), plain URLs otherwise
    s3_presign_expires_s: int = Field(default=7 * 24 * 3600, gt=0, le=7 * 24 * 3600)

    # --- Embedded infrastructure ------------------------------------------------------------
    data_dir: Path = Path("./data")
    embedded_kafka_port: int = Field(default=19092, ge=0, le=65535)
    embedded_s3_port: int = Field(default=18333, ge=0, le=65535)
    embedded_bucket_name: str = "tts-audio"

    # --- Workers and engines ----------------------------------------------------------------
    engine: EngineName = "auto"
    model_dir: Path = Path("./checkpoints")
    fp16: bool = False
    deepspeed: bool = False
    cuda_kernel: bool = False
    # IndexTTS2's device: auto (one GPU per TTS worker, round robin, where there are several; else
    # the package's choice), or cpu, cuda, cuda:N, mps, xpu.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
    # Which TTS worker of this host this is (`all` sets it for each one it starts): picks its GPU.
    worker_index: int = Field(default=0, ge=0)
    # IndexTTS2's text normaliser language: auto (Chinese and English), en, zh or es.
    engine_language: Literal["auto", "en", "zh", "es"] = "auto"
    # Where IndexTTS2's text normaliser keeps its compiled grammars (built once, ~1 min; empty =
    # DATA_DIR/engine-cache). Must be writable; shared safely by the workers of a host.
    engine_cache_dir: Path | None = None
    # One short synthesis at start-up, before the worker takes tasks (the first one is slower).
    engine_warmup: bool = True
    # A TTS worker that has handled this many tasks exits after committing them, and `all` starts
    # a fresh one at once (long-running engines grow in memory); 0: never.
    tts_worker_max_tasks: int = Field(default=0, ge=0)
    tts_workers: int = Field(default=1, ge=0)
    upload_workers: int = Field(default=1, ge=0)
    # CPU threads of one Piper engine; 0: this host's cores shared among its TTS_WORKERS.
    piper_threads: int = Field(default=0, ge=0)
    # Claim-check location for synthesized audio between the TTS and upload workers:
    # a local/shared directory (empty = DATA_DIR/spool) or an S3 staging prefix s3://bucket/prefix/.
    spool_uri: str = ""
    prompt_dir: Path = Path("./prompts")
    prompt_max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    prompt_max_seconds: float = Field(default=60.0, gt=0)
    prompt_connect_timeout_s: float = Field(default=5.0, gt=0)
    prompt_read_timeout_s: float = Field(default=30.0, gt=0)
    prompt_max_redirects: int = Field(default=3, ge=0)
    prompt_download_timeout_s: float = Field(default=60.0, gt=0)
    # A prompt URL fetched this recently is reused without asking again; later, a conditional
    # request (ETag / Last-Modified) avoids downloading it when it did not change.
    prompt_url_cache_s: float = Field(default=60.0, ge=0)
    # Registered voices (POST /voices): the recording's length bounds; uploads are bounded by
    # PROMPT_MAX_BYTES, URL downloads as prompts are.
    voice_min_seconds: float = Field(default=1.0, gt=0)
    voice_max_seconds: float = Field(default=30.0, gt=0)
    # How long an API host trusts that a voice exists before asking S3 again (a delete through
    # another API host is refused at submission after at most this long).
    voice_check_s: float = Field(default=5.0, ge=0)

    # --- Webhooks ---------------------------------------------------------------------------
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # After a failed delivery, retry after these delays (±20% jitter), each scheduled through a
    # Kafka topic of its own so a restart forgets nothing: 7 attempts over about two hours.
    webhook_retry_delays_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0]
    )
    kafka_webhook_retry_topic: str = "tts_webhook_retries"
    # A message whose handling raised an unexpected exception is retried this many times (backoff
    # 1, 2, 5, 10 s), then its task fails and it goes to the dead-letter topic.
    unexpected_error_retries: int = Field(default=4, ge=0)
    upload_concurrency: int = Field(default=4, ge=1)  # results handled at once by one upload worker
    webhook_retry_concurrency: int = Field(default=8, ge=1)

    # --- Observability ----------------------------------------------------------------------
    # Signs task ids (see ids.py); empty: derived from API_PASSWORD. All API hosts must agree.
    task_id_secret: SecretStr | None = None
    health_cache_s: float = Field(default=2.0, ge=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    lag_interval_s: float = Field(default=15.0, gt=0)
    # A worker role run on its own serves Prometheus metrics on this port (empty: none). In `all`,
    # the API's /metrics covers every process of the tree.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # --- Security and logging ---------------------------------------------------------------
    allow_private_urls: bool | None = None  # None: true in embedded mode, false otherwise
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator(
        "kafka_bootstrap_servers",
        "s3_endpoint_url",
        "s3_access_key",
        "s3_bucket_name",
        "s3_public_url",
        "api_username",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # The spec's example sets `S3_ENDPOINT_URL=` for AWS: an empty value means "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("webhook_retry_delays_s", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_retry_delays_s")
    @classmethod
    def _delays_positive(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("webhook retry delays must be positive")
        return value

    @field_validator(
        "api_password",
        "api_keys",
        "s3_secret_key",
        "webhook_secret",
        "kafka_sasl_password",
        "s3_presign",
        "allow_private_urls",
        "engine_cache_dir",
        "kafka_replication_factor",
        "kafka_session_timeout_ms",
        "kafka_heartbeat_interval_ms",
        "kafka_fetch_wait_max_ms",
        mode="before",
    )
    @classmethod
    def _blank_optional_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value:
            return None
        return value

    @model_validator(mode="after")
    def _reject_placeholder_credentials(self) -> Settings:
        password = self.api_password.get_secret_value() if self.api_password else None
        if password is not None and password.lower() in PLACEHOLDER_SECRETS:
            raise ValueError("API_PASSWORD is a placeholder from the example configuration; set a real one")
        for name, value in (("API_USERNAME", self.api_username), ("API_PASSWORD", password)):
            try:
                (value or "").encode("utf-8")
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 (in the environment or .env): no client could send them.
                raise ValueError(f"{name} is not valid UTF-8") from None
        return self

    # --- Derived facts ----------------------------------------------------------------------
    @property
    def kafka_embedded(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def s3_embedded(self) -> bool:
        return not any((self.s3_endpoint_url, self.s3_access_key, self.s3_secret_key, self.s3_bucket_name))

    @property
    def fully_embedded(self) -> bool:
        return self.kafka_embedded and self.s3_embedded

    @property
    def private_urls_allowed(self) -> bool:
        if self.allow_private_urls is not None:
            return self.allow_private_urls
        return self.fully_embedded

    @cached_property
    def task_id_key(self) -> bytes:
        """The key that signs task ids: TASK_ID_SECRET, else derived from the API credentials."""
        if self.task_id_secret is not None:
            return self.task_id_secret.get_secret_value().encode()
        password = self.api_password.get_secret_value() if self.api_password else ""
        return hashlib.sha256(f"indextts-api task ids\0{self.api_username}\0{password}".encode()).digest()

    @property
    def bearer_keys(self) -> list[bytes]:
        """API_KEYS, each as bytes (compared in constant time)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [key.strip().encode() for key in raw.split(",") if key.strip()]

    @property
    def openai_voice_map(self) -> dict[str, str]:
        """OPENAI_VOICES as name -> reference."""
        pairs = (item.partition("=") for item in self.openai_voices.split(",") if item.strip())
        return {name.strip().lower(): reference.strip() for name, _, reference in pairs if reference.strip()}

    @property
    def piper_threads_per_engine(self) -> int:
        if self.piper_threads:
            return self.piper_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.tts_workers))

    @property
    def presign_urls(self) -> bool:
        if self.s3_presign is not None:
            return self.s3_presign
        return self.s3_embedded

    @property
    def bucket(self) -> str:
        return self.s3_bucket_name or self.embedded_bucket_name

    @property
    def webhook_retry_topics(self) -> list[str]:
        """One retry topic per delay: ``{KAFKA_WEBHOOK_RETRY_TOPIC}_1`` ... ``_N``."""
        return [f"{self.kafka_webhook_retry_topic}_{n}" for n in range(1, len(self.webhook_retry_delays_s) + 1)]

    @property
    def engine_cache_location(self) -> Path:
        return (self.engine_cache_dir or self.data_dir / "engine-cache").resolve()

    @property
    def spool_location(self) -> str:
        return self.spool_uri or str((self.data_dir / "spool").resolve())

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, to start another role with exactly the same ones."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = ",".join(str(item) for item in value)
            env[name.upper()] = str(value)
        return env


_current: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, loaded once (or as given to ``configure``)."""
    global _current
    if _current is None:
        _current = Settings()
    return _current


def configure(**overrides: object) -> Settings:
    """Load the settings with command-line overrides on top, and make them the process-wide ones."""
    global _current
    _current = Settings(**overrides)  # type: ignore[arg-type]
    return _current
