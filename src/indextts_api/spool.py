"""The claim check between TTS and upload workers: where synthesized audio waits for upload.

A local or shared directory (default, one host) or an S3 staging prefix (``s3://bucket/prefix/``,
any number of hosts). The result message carries only the URI.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from indextts_api.storage import AudioStore

logger = logging.getLogger(__name__)


class SpoolError(RuntimeError):
    """A spool URI that is malformed or points outside the spool."""


class Spool:
    """Temporary output files for the engine, and durable hand-over to the upload worker."""

    def __init__(self, location: str, s3_client: Any, work_dir: Path) -> None:
        self._s3 = s3_client
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if location.startswith("s3://"):
            parts = urlsplit(location)
            self.staging_bucket: str | None = parts.netloc
            self.staging_prefix = parts.path.strip("/")
            self.directory: Path | None = None
        else:
            self.staging_bucket = None
            self.staging_prefix = ""
            self.directory = Path(location).resolve()
            self.directory.mkdir(parents=True, exist_ok=True)

    def scratch_path(self, task_uuid: str) -> Path:
        """A fresh file name for the engine to write (never reused: a retry gets a new one)."""
        base = self.directory or self.work_dir
        return base / f".{task_uuid}.{uuid.uuid4().hex[:8]}.partial.wav"

    def store(self, task_uuid: str, scratch: Path) -> str:
        """Make the engine's output durable for the upload worker; returns its URI."""
        if self.directory is not None:
            final = self.directory / f"{task_uuid}.wav"
            scratch.replace(final)
            return final.as_uri()
        key = f"{self.staging_prefix}/{task_uuid}.wav" if self.staging_prefix else f"{task_uuid}.wav"
        try:
            self._s3.upload_file(str(scratch), self.staging_bucket, key)
        finally:
            scratch.unlink(missing_ok=True)
        return f"s3://{self.staging_bucket}/{key}"

    def _local_path(self, uri: str) -> Path:
        if self.directory is None:
            raise SpoolError(f"this worker has no local spool for {uri}")
        path = Path(urlsplit(uri).path).resolve()
        # A result message must not make the upload worker read files outside the spool.
        if path.parent != self.directory:
            raise SpoolError(f"spool file {path} is outside the spool directory {self.directory}")
        return path

    def _staging_key(self, uri: str) -> tuple[str, str]:
        parts = urlsplit(uri)
        key = parts.path.lstrip("/")
        if parts.netloc != self.staging_bucket or not key.startswith(self.staging_prefix):
            raise SpoolError(f"spool object {uri} is outside the staging prefix")
        return parts.netloc, key

    def transfer(self, uri: str, store: AudioStore, key: str, metadata: dict[str, str] | None = None) -> None:
        """Put the spooled audio at ``key`` in the audio bucket, with user ``metadata``."""
        if uri.startswith("file:"):
            path = self._local_path(uri)
            if not path.is_file():
                raise SpoolError(f"spool file {path} is missing (another host's spool, or already removed)")
            store.upload_file(path, key, metadata)
        elif uri.startswith("s3:"):
            bucket, staging_key = self._staging_key(uri)
            store.copy_from(bucket, staging_key, key, metadata)
        else:
            raise SpoolError(f"unknown spool URI {uri!r}")

    @contextlib.contextmanager
    def local_copy(self, uri: str) -> Iterator[Path]:
        """The spooled audio as a local file, for the encoder: the spool file itself, or a
        download of the staging object (removed afterwards)."""
        if uri.startswith("file:"):
            path = self._local_path(uri)
            if not path.is_file():
                raise SpoolError(f"spool file {path} is missing (another host's spool, or already removed)")
            yield path
            return
        if not uri.startswith("s3:"):
            raise SpoolError(f"unknown spool URI {uri!r}")
        bucket, staging_key = self._staging_key(uri)
        fd, name = tempfile.mkstemp(prefix="staged-", suffix=".wav", dir=self.work_dir)
        copy = Path(name)
        try:
            with open(fd, "wb") as sink:
                try:
                    self._s3.download_fileobj(bucket, staging_key, sink)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                        raise SpoolError(f"spool object {uri} is missing (already removed)") from None
                    raise
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def discard(self, uri: str) -> None:
        """Remove spooled audio after upload (missing is fine: a redelivery may find it gone)."""
        with contextlib.suppress(SpoolError, OSError):
            if uri.startswith("file:"):
                self._local_path(uri).unlink(missing_ok=True)
            elif uri.startswith("s3:"):
                bucket, key = self._staging_key(uri)
                self._s3.delete_object(Bucket=bucket, Key=key)


def make_work_dir(data_dir: Path, role: str) -> Path:
    """A private scratch directory for one worker process."""
    base = data_dir / "work"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{role}-", dir=base))
