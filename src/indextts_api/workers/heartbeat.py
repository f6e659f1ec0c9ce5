"""Worker heartbeats: a small JSON object per live TTS worker in the bucket, so that any API host
can tell whether an engine is serving (``/health`` check ``engine``) without new infrastructure."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from indextts_api.config import Settings

logger = logging.getLogger(__name__)


def heartbeat_prefix(settings: Settings) -> str:
    prefix = settings.s3_key_prefix.strip("/")
    return f"{prefix}/workers/" if prefix else "workers/"


class Heartbeat:
    def __init__(
        self,
        settings: Settings,
        s3_client: Any,
        bucket: str,
        details: dict[str, Any],
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._settings = settings
        self._client = s3_client
        self._bucket = bucket
        self._key = f"{heartbeat_prefix(settings)}{socket.gethostname()}-{os.getpid()}.json"
        self._details = {**details, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        self._status = status  # what changes while the worker runs, read at each beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                current = self._status() if self._status else {}
                body = json.dumps({**self._details, **current, "seen_at": time.time()}).encode()
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body, ContentType="application/json")
            except Exception as exc:  # noqa: BLE001 - S3 down: the health check will say so
                logger.debug("heartbeat not written: %s", exc)
            if self._stop.wait(self._settings.heartbeat_interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key)
        except Exception as exc:  # noqa: BLE001 - it expires by age anyway
            logger.debug("heartbeat not removed: %s", exc)
