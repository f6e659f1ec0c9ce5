"""Webhook delivery to the client's ``hook_url``: the spec's payload, signed when a secret is set,
retried durably through Kafka when the receiver does not answer 2xx.

Retry schedule: after a failed attempt n (1-based), the webhook is produced to the retry topic
``{KAFKA_WEBHOOK_RETRY_TOPIC}_{n}`` with a due time ``now + WEBHOOK_RETRY_DELAYS_S[n-1]`` (±20%
jitter). Each retry topic holds one delay, so its messages are in due order and a consumer waits
for the head one only. After the last delay the webhook goes to the dead-letter topic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass

import httpx
from confluent_kafka import Message
from pydantic import BaseModel, ValidationError

from indextts_api import kafka
from indextts_api.config import Settings
from indextts_api.logs import bind_task
from indextts_api.metrics import WEBHOOK_DELIVERIES
from indextts_api.schemas import WebhookPayload
from indextts_api.tasks import TaskStateStore
from indextts_api.workers.failures import describe

logger = logging.getLogger(__name__)

JITTER = 0.2


@dataclass
class Delivery:
    delivered: bool
    status_code: int | None = None
    error: str | None = None
    permanent: bool = False  # the hook_url can never be delivered to: retrying is pointless


class WebhookMessage(BaseModel):
    """A webhook waiting for its next attempt (retry topics; key = task_uuid)."""

    v: int = 1
    hook_url: str
    payload: WebhookPayload
    attempts: int  # attempts made so far
    due_at: float
    last_error: str | None = None
    upload_s: float | None = None  # carried into each attempt's delivery record (see webhook_document)


def webhook_document(attempts: int, delivery: Delivery, upload_s: float | None = None) -> dict[str, object]:
    """The webhook's delivery record as GET /tasks shows it; it also carries the upload's duration,
    known only once the upload (which recorded the outcome) is done."""
    return {
        "attempts": attempts,
        "delivered": delivery.delivered,
        "last_status_code": delivery.status_code,
        "last_error": delivery.error,
        "last_attempt_at": time.time(),
        "upload_s": upload_s,
    }


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


def attempt_delivery(client: httpx.Client, settings: Settings, url: str, payload: WebhookPayload) -> Delivery:
    """One POST of the payload; 2xx is delivered, anything else (or no answer) is not."""
    body = json.dumps(payload.to_json(), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if settings.webhook_secret is not None:
        # One id per event, the same on every attempt, so a receiver can drop duplicates.
        message_id = f"msg_{payload.task_uuid}_{payload.status}"
        secret = secret_bytes(settings.webhook_secret.get_secret_value())
        headers.update(signature_headers(secret, message_id, int(time.time()), body))
    try:
        response = client.post(url, content=body, headers=headers)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError, UnicodeError, ValueError) as exc:
        # A URL or header the client cannot even send (validation at submission refuses these;
        # older queued tasks or other producers may still carry one).
        return Delivery(delivered=False, error=f"{type(exc).__name__}: {exc}", permanent=True)
    except Exception as exc:  # noqa: BLE001 - any other failure to get an answer: not delivered, retried
        return Delivery(delivered=False, error=f"{type(exc).__name__}: {exc}")
    if 200 <= response.status_code < 300:
        return Delivery(delivered=True, status_code=response.status_code)
    return Delivery(delivered=False, status_code=response.status_code, error=f"HTTP {response.status_code}")


def schedule_retry(
    producer: kafka.SyncProducer,
    settings: Settings,
    url: str,
    payload: WebhookPayload,
    attempts: int,
    error: str | None,
    upload_s: float | None = None,
) -> bool:
    """Durably schedule the next attempt after ``attempts`` failed ones; False when none is left."""
    delays = settings.webhook_retry_delays_s
    if attempts > len(delays):
        return False
    delay = delays[attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    pending = WebhookMessage(
        hook_url=url,
        payload=payload,
        attempts=attempts,
        due_at=time.time() + delay,
        last_error=error,
        upload_s=upload_s,
    )
    producer.send(settings.webhook_retry_topics[attempts - 1], payload.task_uuid, pending.model_dump_json().encode())
    logger.warning(
        "task %s webhook attempt %d failed (%s); next attempt in %.1f s", payload.task_uuid, attempts, error, delay
    )
    return True


def due_at(message: Message) -> float | None:
    """When a retry message is due (None if it cannot be read: the handler dead-letters it)."""
    try:
        return float(json.loads(message.value() or b"{}")["due_at"])
    except (ValueError, KeyError, TypeError):
        return None


class WebhookRetrier:
    """Handles due messages of the retry topics: one more attempt, then the next tier or dead letters."""

    def __init__(
        self, settings: Settings, client: httpx.Client, producer: kafka.SyncProducer, states: TaskStateStore
    ) -> None:
        self._settings = settings
        self._client = client
        self._producer = producer
        self._states = states

    def handle(self, message: Message) -> None:
        try:
            pending = WebhookMessage.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            kafka.dead_letter(self._producer, self._settings, message, f"invalid webhook retry message: {exc}")
            return
        attempt = pending.attempts + 1
        uuid = pending.payload.task_uuid
        with bind_task(uuid):
            self._retry(message, pending, attempt)

    def _retry(self, message: Message, pending: WebhookMessage, attempt: int) -> None:
        uuid = pending.payload.task_uuid
        delivery = attempt_delivery(self._client, self._settings, pending.hook_url, pending.payload)
        self._states.write_async(uuid, "webhook", webhook_document(attempt, delivery, pending.upload_s))
        if delivery.delivered:
            WEBHOOK_DELIVERIES.labels("delivered", str(attempt)).inc()
            logger.info("task %s webhook delivered on attempt %d", uuid, attempt)
            return
        WEBHOOK_DELIVERIES.labels("failed", str(attempt)).inc()
        if delivery.permanent or not schedule_retry(
            self._producer, self._settings, pending.hook_url, pending.payload, attempt, delivery.error, pending.upload_s
        ):
            reason = f"webhook not delivered after {attempt} attempts; last error: {delivery.error}"
            WEBHOOK_DELIVERIES.labels("dead_lettered", str(attempt)).inc()
            kafka.dead_letter(self._producer, self._settings, message, reason)

    def give_up(self, message: Message, failure: BaseException) -> None:
        """A retry message whose handling failed for good (failures.py decided): dead letters."""
        kafka.dead_letter(
            self._producer, self._settings, message, f"webhook retry failed for good: {describe(failure)}"
        )
