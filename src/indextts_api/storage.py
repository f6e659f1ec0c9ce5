"""The one S3 client: audio objects, their keys and the URL a client receives."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from indextts_api.config import Settings

logger = logging.getLogger(__name__)

AUDIO_CONTENT_TYPE = "audio/wav"
# Larger files (about an hour of 22 kHz speech) go up in parts, in parallel.
SINGLE_PUT_MAX_BYTES = 128 * 1024 * 1024


def make_s3_client(
    settings: Settings, *, connect_timeout_s: float = 5, read_timeout_s: float = 60, attempts: int = 5
) -> Any:
    """A boto3 S3 client with timeouts and bounded retries (one per process, shared by threads)."""
    custom_endpoint = settings.s3_endpoint_url is not None
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": attempts, "mode": "standard"},
        # MinIO, SeaweedFS and most S3-compatible servers want path-style addressing.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        max_pool_connections=32,
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        region_name=settings.s3_region,
        config=config,
    )


def audio_key(settings: Settings, task_uuid: str, extension: str = "wav") -> str:
    """``<task_uuid>.<extension>``, under S3_KEY_PREFIX if set."""
    prefix = settings.s3_key_prefix.strip("/")
    return f"{prefix}/{task_uuid}.{extension}" if prefix else f"{task_uuid}.{extension}"


def public_url(settings: Settings, key: str) -> str:
    """The URL the spec's rules give for ``key`` (S3_PUBLIC_URL; R2; other endpoints path-style; AWS)."""
    if settings.s3_public_url:
        return f"{settings.s3_public_url.rstrip('/')}/{key}"
    if settings.s3_endpoint_url:
        endpoint = settings.s3_endpoint_url.rstrip("/")
        if "r2.cloudflarestorage.com" in endpoint:
            return f"{endpoint}/{key}"
        return f"{endpoint}/{settings.bucket}/{key}"
    return f"https://{settings.bucket}.s3.{settings.s3_region}.amazonaws.com/{key}"


class AudioStore:
    """Finished audio in the bucket."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self._settings = settings
        self.client = client
        self.bucket = settings.bucket

    def key_for(self, task_uuid: str, extension: str = "wav") -> str:
        return audio_key(self._settings, task_uuid, extension)

    def find_audio(self, task_uuid: str) -> str | None:
        """The key of the task's audio in whichever format it was delivered, or None."""
        prefix = audio_key(self._settings, task_uuid, "")
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=4)
        keys = [item["Key"] for item in listing.get("Contents", []) if "/" not in item["Key"][len(prefix) :]]
        return keys[0] if keys else None

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            logger.info("creating bucket %s", self.bucket)
            self.client.create_bucket(Bucket=self.bucket)

    def upload_file(
        self,
        path: Path,
        key: str,
        metadata: dict[str, str] | None = None,
        content_type: str = AUDIO_CONTENT_TYPE,
    ) -> None:
        """Store the audio at ``key``, with user ``metadata`` (x-amz-meta-*) if given."""
        extra = {"ContentType": content_type, "Metadata": metadata or {}}
        if path.stat().st_size <= SINGLE_PUT_MAX_BYTES:
            # One PUT: boto3's upload_file starts a transfer manager and its threads for every
            # file, which cost more than the upload itself for a few seconds of speech.
            with path.open("rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
            return
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)

    def copy_from(self, source_bucket: str, source_key: str, key: str, metadata: dict[str, str] | None = None) -> None:
        self.client.copy_object(
            Bucket=self.bucket,
            Key=key,
            CopySource={"Bucket": source_bucket, "Key": source_key},
            ContentType=AUDIO_CONTENT_TYPE,
            Metadata=metadata or {},
            MetadataDirective="REPLACE",
        )

    def metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata, or None if there is no object at ``key``."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        found: dict[str, str] = head.get("Metadata") or {}
        return found

    def exists(self, key: str) -> bool:
        return self.metadata(key) is not None

    def url_for(self, key: str) -> str:
        """The URL sent in the webhook: presigned for private buckets, else the spec's public URL."""
        if self._settings.presign_urls:
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": key},
                    ExpiresIn=self._settings.s3_presign_expires_s,
                )
            )
        return public_url(self._settings, key)
