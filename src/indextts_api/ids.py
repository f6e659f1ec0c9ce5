"""Task ids that prove where they came from.

A task id is a UUIDv7 (so it carries its creation time, in milliseconds) whose last 32 bits are
an HMAC of the rest under the service's secret. The API writes nothing per accepted task besides
the Kafka message, yet ``GET /tasks/{id}`` can tell a queued task (ours, nothing recorded yet)
from an unknown id (404), on any API host that shares the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import uuid

_MAC_BITS = 32
_MAC_MASK = (1 << _MAC_BITS) - 1


def _mac(secret: bytes, head: int) -> int:
    digest = hmac.new(secret, head.to_bytes(12, "big"), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big")


def new_task_uuid(secret: bytes, now_s: float | None = None) -> str:
    """A UUIDv7 (RFC 9562 layout) signed in its last 32 random bits."""
    millis = int((time.time() if now_s is None else now_s) * 1000) & ((1 << 48) - 1)
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (millis << 80) | (0x7 << 76) | ((random_bits >> 68) & 0xFFF) << 64 | (0b10 << 62)
    value |= (random_bits & ((1 << 62) - 1)) & ~_MAC_MASK
    value |= _mac(secret, value >> _MAC_BITS)
    return str(uuid.UUID(int=value))


def issued_at(task_uuid: str, secret: bytes) -> float | None:
    """When this service issued ``task_uuid`` (seconds since the epoch), or None if it did not."""
    try:
        value = uuid.UUID(task_uuid).int
    except ValueError:
        return None
    if (value >> 76) & 0xF != 7 or not hmac.compare_digest(
        (value & _MAC_MASK).to_bytes(4, "big"), _mac(secret, value >> _MAC_BITS).to_bytes(4, "big")
    ):
        return None
    return (value >> 80) / 1000.0
