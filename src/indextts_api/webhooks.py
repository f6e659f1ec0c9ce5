"""Webhook delivery to the client's ``hook_url``: the spec's payload, signed when a secret is set."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

import httpx

from indextts_api.config import Settings
from indextts_api.schemas import WebhookPayload

logger = logging.getLogger(__name__)


@dataclass
class Delivery:
    delivered: bool
    attempts: int
    status_code: int | None = None
    error: str | None = None


def signature_headers(secret: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}


def secret_bytes(secret: str) -> bytes:
    """Standard Webhooks secrets are ``whsec_<base64>``; any other string is used as raw bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def deliver(client: httpx.Client, settings: Settings, url: str, payload: WebhookPayload) -> Delivery:
    """POST the payload, retrying non-2xx answers and network errors a few times with backoff."""
    body = json.dumps(payload.to_json(), separators=(",", ":")).encode()
    # One id per event, stable across attempts, so a receiver can drop duplicates.
    message_id = f"msg_{payload.task_uuid}_{payload.status}"
    delivery = Delivery(delivered=False, attempts=0)
    for attempt in range(1, settings.webhook_attempts + 1):
        delivery.attempts = attempt
        headers = {"Content-Type": "application/json"}
        if settings.webhook_secret is not None:
            headers.update(
                signature_headers(
                    secret_bytes(settings.webhook_secret.get_secret_value()), message_id, int(time.time()), body
                )
            )
        try:
            response = client.post(url, content=body, headers=headers)
            delivery.status_code = response.status_code
            if 200 <= response.status_code < 300:
                delivery.delivered = True
                return delivery
            delivery.error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "task %s webhook attempt %d/%d failed: %s",
            payload.task_uuid,
            attempt,
            settings.webhook_attempts,
            delivery.error,
        )
        if attempt < settings.webhook_attempts:
            time.sleep(settings.webhook_backoff_s * 2 ** (attempt - 1))
    return delivery
