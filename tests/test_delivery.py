"""Webhook delivery: retried durably through Kafka, signed, never blocking other tasks."""

from __future__ import annotations

import itertools
import os
import signal
import time

import httpx
import pytest
from standardwebhooks import Webhook

from indextts_api.devtools import WebhookReceiver
from tests.conftest import WEBHOOK_SECRET, Service, wait_for_worker
from tests.test_pipeline import WEBHOOK_TIMEOUT_S


def submit_to(api: httpx.Client, receiver: WebhookReceiver, path: str, text: str) -> str:
    body = {"spk_audio_prompt": "example.wav", "text": text, "hook_url": receiver.url(path)}
    response = api.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["task_uuid"])


def test_refused_webhooks_are_retried_until_delivered_and_signed(api: httpx.Client, receiver: WebhookReceiver) -> None:
    receiver.script("/flaky", [500, 503, 404])
    task_uuid = submit_to(api, receiver, "/flaky", "Delivered on the fourth attempt.")
    receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    attempts = receiver.wait_for(task_uuid, 1, count=4, delivered=False)
    assert [hook.answered for hook in attempts] == [500, 503, 404, 200]
    # Every attempt carries the same event id, so a receiver can drop duplicates, and a valid signature.
    assert len({hook.headers["webhook-id"] for hook in attempts}) == 1
    for hook in attempts:
        assert Webhook(WEBHOOK_SECRET).verify(hook.body, hook.headers)["task_uuid"] == task_uuid
    # Spread out by the configured delays (0.5 s, 1 s, 1 s with ±20% jitter).
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.35 and gaps[1] >= 0.75 and gaps[2] >= 0.75


def test_forged_signature_does_not_verify(api: httpx.Client, receiver: WebhookReceiver) -> None:
    task_uuid = submit_to(api, receiver, "/signed", "Signed webhooks.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    tampered = hook.body.replace(b"success", b"failed")
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        Webhook(WEBHOOK_SECRET).verify(tampered, hook.headers)


def test_a_slow_receiver_does_not_block_other_tasks(api: httpx.Client, receiver: WebhookReceiver) -> None:
    # Slower than any other step, yet within WEBHOOK_TIMEOUT_S (3 s here): it is delivered, late.
    receiver.script("/slow-receiver", [200], delay_s=2.5)
    slow = submit_to(api, receiver, "/slow-receiver", "My receiver is slow.")
    time.sleep(0.5)
    fast = submit_to(api, receiver, "/fast-receiver", "Mine is fast.")
    [fast_hook] = receiver.wait_for(fast, WEBHOOK_TIMEOUT_S)
    [slow_hook] = receiver.wait_for(slow, WEBHOOK_TIMEOUT_S)
    assert fast_hook.received_at < slow_hook.received_at - 1.5


@pytest.mark.timeout(180)
def test_pending_retry_survives_an_upload_worker_kill(
    api: httpx.Client, receiver: WebhookReceiver, service: Service
) -> None:
    receiver.script("/down-for-a-while", [503] * 3)
    task_uuid = submit_to(api, receiver, "/down-for-a-while", "My receiver is down for a while.")
    receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S, count=1, delivered=False)
    # The first attempt failed and the retry is scheduled: kill the worker that scheduled it.
    victim = wait_for_worker(service.process.pid, "upload-worker")
    os.kill(victim, signal.SIGKILL)
    replacement = wait_for_worker(service.process.pid, "upload-worker", not_pid=victim)
    assert replacement != victim
    [hook] = receiver.wait_for(task_uuid, 120)
    assert hook.payload["status"] == "success"
