"""No input can stop a worker: poison messages through the running service end in bounded time.

Validation at submission refuses these inputs (test_api_http.py, test_input_fuzz.py); here they
are put on the topics directly, as a queued task from an older version or another producer would
be, to prove that the workers' failure policy (workers/failures.py) holds behind the API too: the
task ends with its failure webhook, or the message goes to the dead-letter topic with its reason,
and the tasks behind it are delivered.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from indextts_api import kafka
from indextts_api.config import Settings
from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra
from tests.conftest import Service

POISON_TIMEOUT_S = 60
DEAD_LETTER_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def topics(infra: EmbeddedInfra) -> Settings:
    """The session service's topics (the defaults), on the session broker."""
    return Settings(_env_file=None, kafka_bootstrap_servers=infra.kafka_bootstrap_servers, kafka_profile="embedded")  # type: ignore[call-arg]


def queue_raw_task(settings: Settings, **fields: Any) -> str:
    """A task message produced straight to the task topic, bypassing the API's validation."""
    task_uuid = str(uuid.uuid4())
    message = {
        "v": 1,
        "task_uuid": task_uuid,
        "spk_audio_prompt": "example.wav",
        "text": "A task that came another way.",
        "params": {},
        "timestamp": time.time(),
        **fields,
    }
    producer = kafka.SyncProducer(settings)
    try:
        producer.send(settings.kafka_task_topic, task_uuid, json.dumps(message).encode())
    finally:
        producer.close()
    return task_uuid


def submit(api: httpx.Client, receiver: WebhookReceiver, text: str) -> str:
    body = {"spk_audio_prompt": "example.wav", "text": text, "hook_url": receiver.url("/after-poison")}
    response = api.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["task_uuid"])


def dead_letters(settings: Settings, key: str, timeout_s: float) -> list[dict[str, Any]]:
    """Dead-letter envelopes for ``key``, read from the start of the topic by a new group."""
    consumer = kafka.make_consumer(settings, f"dead-letter-reader-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([settings.kafka_dead_letter_topic])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not found:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            envelope = json.loads(message.value() or b"{}")
            if envelope.get("key") == key:
                found.append(envelope)
    finally:
        consumer.close()
    return found


def test_unbuildable_prompt_url_fails_the_task_and_the_next_one_succeeds(
    service: Service, api: httpx.Client, receiver: WebhookReceiver, topics: Settings
) -> None:
    started = time.monotonic()
    poison = queue_raw_task(
        topics, spk_audio_prompt="http://voices..example.com/voice.wav", hook_url=receiver.url("/poison")
    )
    hook = receiver.wait_for(poison, timeout_s=POISON_TIMEOUT_S)[0].payload
    assert hook["status"] == "failed", hook
    assert "spk_audio_prompt" in hook["error_message"], hook
    assert time.monotonic() - started < POISON_TIMEOUT_S
    after = submit(api, receiver, "The task after the poison one.")
    assert receiver.wait_for(after, timeout_s=POISON_TIMEOUT_S)[0].payload["status"] == "success"


def test_invalid_task_message_gets_a_failure_webhook_naming_the_field(
    api: httpx.Client, receiver: WebhookReceiver, topics: Settings
) -> None:
    poison = queue_raw_task(topics, params={"temperature": "very hot"}, hook_url=receiver.url("/poison"))
    hook = receiver.wait_for(poison, timeout_s=POISON_TIMEOUT_S)[0].payload
    assert hook["status"] == "failed", hook
    assert hook["error_message"].startswith("invalid task: ") and "temperature" in hook["error_message"], hook
    envelope = dead_letters(topics, poison, DEAD_LETTER_TIMEOUT_S)
    assert envelope and "invalid task message" in envelope[0]["reason"]


def test_unbuildable_hook_urls_do_not_hold_the_upload_slots(
    api: httpx.Client, receiver: WebhookReceiver, topics: Settings
) -> None:
    """More unusable hook URLs than the upload worker has slots (UPLOAD_CONCURRENCY=4): each is
    dead-lettered at its first attempt, not retried, and the tasks behind them are delivered."""
    bad_hooks = [
        receiver.url("/crlf\r\nX-Injected: 1"),
        receiver.url("/tab\there"),
        "http://hooks..example.com/hook",
        f"http://{'a' * 64}.example.com/hook",
        "http://[::1/hook",
    ]
    poisons = [queue_raw_task(topics, hook_url=hook) for hook in bad_hooks]
    after = [submit(api, receiver, f"Delivered behind a poison webhook, {n}.") for n in range(3)]
    for task_uuid in after:
        assert receiver.wait_for(task_uuid, timeout_s=POISON_TIMEOUT_S)[0].payload["status"] == "success"
    for task_uuid, hook in zip(poisons, bad_hooks, strict=True):
        envelopes = dead_letters(topics, task_uuid, DEAD_LETTER_TIMEOUT_S)
        assert envelopes, f"no dead letter for the task with hook_url {hook!r}"
        assert "webhook" in envelopes[0]["reason"] or "invalid task message" in envelopes[0]["reason"], envelopes
