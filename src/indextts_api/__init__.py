"""IndexTTS API: a text-to-speech job service (HTTP API, Kafka queue, S3 storage, webhooks)."""

__version__ = "0.1.0"
