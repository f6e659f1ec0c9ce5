"""Nothing accepted is lost: real processes, real faults (killed workers, stopped broker and S3).

These tests run their own broker, S3 server and service (they stop and kill them), so the rest of
the suite is not disturbed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer

from indextts_api.config import Settings
from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.kafka import SyncProducer
from tests.conftest import (
    Service,
    embedded_servers,
    launch_service,
    own_topics,
    stop_service,
    wait_for_worker,
    worker_pids,
)

LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the quiet river bank."] * 25)
DELIVERY_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def fault_infra(fault_dir: Path) -> Iterator[EmbeddedInfra]:
    with embedded_servers(fault_dir / "infra") as servers:
        yield servers


@pytest.fixture(scope="module")
def fault_service(fault_dir: Path, fault_infra: EmbeddedInfra, prompt_dir: Path) -> Iterator[Service]:
    running = launch_service(fault_dir, fault_infra, prompt_dir, "--tts-workers", "2", "--upload-workers", "1")
    yield running
    stop_service(running)


@pytest.fixture
def fault_api(fault_service: Service) -> Iterator[httpx.Client]:
    with fault_service.client() as client:
        yield client


def submit(api: httpx.Client, receiver: WebhookReceiver, text: str, path: str = "/faults") -> str:
    body = {"spk_audio_prompt": "example.wav", "text": text, "hook_url": receiver.url(path)}
    response = api.post("/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["task_uuid"])


def assert_all_delivered(receiver: WebhookReceiver, task_uuids: list[str], timeout_s: float) -> dict[str, int]:
    """Every task got a success webhook; returns how many deliveries each got (duplicates > 1)."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    for task_uuid in task_uuids:
        hooks = receiver.wait_for(task_uuid, max(1.0, deadline - time.monotonic()))
        assert hooks[0].payload["status"] == "success", hooks[0].payload
        counts[task_uuid] = len(hooks)
    return counts


def test_sigkill_tts_worker_mid_synthesis(
    fault_api: httpx.Client, fault_service: Service, receiver: WebhookReceiver
) -> None:
    task_uuid = submit(fault_api, receiver, LONG_TEXT)
    time.sleep(1.5)  # the worker has the task and is synthesizing (about 8 s of work)
    wait_for_worker(fault_service.process.pid, "tts-worker")
    for victim in worker_pids(fault_service.process.pid, "tts-worker"):  # whichever has the task
        os.kill(victim, signal.SIGKILL)
    # The task's offset was never committed: another worker (or the restarted one) does it again.
    assert_all_delivered(receiver, [task_uuid], DELIVERY_TIMEOUT_S)


def test_sigkill_upload_worker_mid_delivery(
    fault_api: httpx.Client, fault_service: Service, receiver: WebhookReceiver
) -> None:
    receiver.script("/slow-during-kill", [200], delay_s=2.0)
    task_uuid = submit(fault_api, receiver, "Killed while calling back.", path="/slow-during-kill")
    time.sleep(1.0)  # synthesized and uploaded; the webhook request is in flight (the receiver takes 2 s)
    victim = wait_for_worker(fault_service.process.pid, "upload-worker")
    os.kill(victim, signal.SIGKILL)
    wait_for_worker(fault_service.process.pid, "upload-worker", not_pid=victim)
    assert_all_delivered(receiver, [task_uuid], DELIVERY_TIMEOUT_S)


def test_sigterm_lets_a_tts_worker_finish_its_task(
    fault_api: httpx.Client, fault_service: Service, receiver: WebhookReceiver
) -> None:
    task_uuid = submit(fault_api, receiver, "Finish what you started. " * 8)
    time.sleep(0.5)
    wait_for_worker(fault_service.process.pid, "tts-worker")
    for worker in worker_pids(fault_service.process.pid, "tts-worker"):
        os.kill(worker, signal.SIGTERM)
    assert_all_delivered(receiver, [task_uuid], DELIVERY_TIMEOUT_S)


def test_tts_worker_is_recycled_after_max_tasks(
    tmp_path: Path, infra: EmbeddedInfra, prompt_dir: Path, receiver: WebhookReceiver
) -> None:
    """TTS_WORKER_MAX_TASKS=2: each worker commits its two tasks and exits, `all` starts a fresh one
    at once (no backoff), and every task is delivered exactly once."""
    service = launch_service(tmp_path, infra, prompt_dir, "--tts-worker-max-tasks", "2", **own_topics("recycle"))
    try:
        first = wait_for_worker(service.process.pid, "tts-worker")
        environ = Path(f"/proc/{first}/environ").read_bytes().split(b"\0")
        assert b"WORKER_INDEX=0" in environ  # its GPU on a multi-GPU host
        with service.client() as api:
            tasks = [submit(api, receiver, f"Recycled worker, task {n}.", path="/recycle") for n in range(5)]
        counts = assert_all_delivered(receiver, tasks, DELIVERY_TIMEOUT_S)
        assert set(counts.values()) == {1}, counts
        wait_for_worker(service.process.pid, "tts-worker", not_pid=first)
        log = service.process.log_tail(60000)
        assert log.count("reached TTS_WORKER_MAX_TASKS; starting a fresh one") == 2, log
        assert "restarting in" not in log
    finally:
        stop_service(service)


def test_broker_outage_answers_503_and_resumes(
    fault_api: httpx.Client, fault_infra: EmbeddedInfra, receiver: WebhookReceiver
) -> None:
    before = submit(fault_api, receiver, "Accepted just before the broker stopped.")
    fault_infra.stop_server("tansu")
    try:
        started = time.monotonic()
        body = {"spk_audio_prompt": "example.wav", "text": "Broker is down.", "hook_url": receiver.url("/faults")}
        refused = fault_api.post("/generate", json=body, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json() == {"error": "task queue unavailable; retry later"}
        assert time.monotonic() - started < 15
    finally:
        fault_infra.start_server("tansu")
    # Work resumes by itself: new tasks are accepted again and everything accepted is delivered.
    after: list[str] = []
    deadline = time.monotonic() + 60
    while not after and time.monotonic() < deadline:
        response = fault_api.post("/generate", json={**body, "text": "The broker is back."}, timeout=30)
        if response.status_code == 200:
            after.append(response.json()["task_uuid"])
    assert after, "the API did not recover after the broker came back"
    assert_all_delivered(receiver, [before, *after], DELIVERY_TIMEOUT_S)


def test_s3_outage_delays_but_loses_nothing(
    fault_api: httpx.Client, fault_infra: EmbeddedInfra, receiver: WebhookReceiver
) -> None:
    accepted = [submit(fault_api, receiver, f"Stored while the storage was away, number {n}.") for n in range(4)]
    fault_infra.stop_server("seaweedfs")
    time.sleep(15)
    fault_infra.start_server("seaweedfs")
    accepted += [submit_when_possible(fault_api, receiver, "After the storage came back.")]
    assert_all_delivered(receiver, accepted, DELIVERY_TIMEOUT_S)


def submit_when_possible(
    api: httpx.Client, receiver: WebhookReceiver, text: str, timeout_s: float = 60, path: str = "/faults"
) -> str:
    deadline = time.monotonic() + timeout_s
    body = {"spk_audio_prompt": "example.wav", "text": text, "hook_url": receiver.url(path)}
    while time.monotonic() < deadline:
        response = api.post("/generate", json=body, timeout=30)
        if response.status_code == 200:
            return str(response.json()["task_uuid"])
        assert response.status_code == 503
    raise AssertionError("no task accepted")


def test_unreadable_message_goes_to_dead_letters(
    fault_service: Service, fault_infra: EmbeddedInfra, fault_api: httpx.Client, receiver: WebhookReceiver
) -> None:
    settings = Settings(
        _env_file=None, kafka_bootstrap_servers=fault_infra.kafka_bootstrap_servers, kafka_profile="embedded"
    )  # type: ignore[call-arg]
    producer = SyncProducer(settings)
    producer.send(settings.kafka_task_topic, "garbage", b"{this is not a task")
    producer.close()
    consumer = Consumer(
        {
            "bootstrap.servers": fault_infra.kafka_bootstrap_servers,
            "group.id": "dlq-reader",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([settings.kafka_dead_letter_topic])
    try:
        deadline = time.monotonic() + 60
        parked = None
        while parked is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                envelope = json.loads(message.value() or b"{}")
                if envelope.get("value") == "{this is not a task":
                    parked = envelope
        assert parked is not None, "the bad message did not reach the dead-letter topic"
        assert parked["reason"].startswith("invalid task message")
        assert parked["topic"] == settings.kafka_task_topic
    finally:
        consumer.close()
    # The worker went on.
    assert_all_delivered(receiver, [submit(fault_api, receiver, "After a poison message.")], DELIVERY_TIMEOUT_S)


@pytest.mark.timeout(600)
def test_soak_with_random_faults_loses_nothing(
    fault_api: httpx.Client, fault_service: Service, receiver: WebhookReceiver
) -> None:
    rng = random.Random(20261125)
    total = 200
    # A receiver that refuses about one attempt in ten.
    receiver.script("/soak", [503 if rng.random() < 0.1 else 200 for _ in range(3 * total)])
    accepted: list[str] = []
    faults: list[str] = []
    for n in range(total):
        # A 503 (broker too slow under load) means "not accepted, retry": the client retries.
        accepted.append(submit_when_possible(fault_api, receiver, f"Soak task number {n}.", path="/soak"))
        if n % 40 == 20:
            role = rng.choice(["tts-worker", "upload-worker"])
            os.kill(wait_for_worker(fault_service.process.pid, role), signal.SIGKILL)
            faults.append(f"SIGKILL {role} after task {n}")
        time.sleep(0.05)
    counts = assert_all_delivered(receiver, accepted, 420)
    duplicates = sum(count - 1 for count in counts.values())
    print(f"soak: {total} accepted, {len(counts)} delivered, {duplicates} duplicate deliveries; faults: {faults}")
    assert len(counts) == total


def wait_for_health_status(url: str, code: int, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        last = httpx.get(url, timeout=15)
        if last.status_code == code:
            body: dict[str, object] = last.json()
            return body
        time.sleep(0.5)
    raise AssertionError(f"/health did not answer {code} within {timeout_s} s: {last.text if last else None}")


@pytest.mark.parametrize(("server", "check"), [("seaweedfs", "s3"), ("tansu", "kafka")])
def test_health_names_the_dependency_that_is_down(
    fault_service: Service, fault_infra: EmbeddedInfra, server: str, check: str
) -> None:
    url = f"{fault_service.base_url}/health"
    wait_for_health_status(url, 200, 60)
    fault_infra.stop_server(server)
    try:
        body = wait_for_health_status(url, 503, 20)
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert body["status"] == "unhealthy" and checks[check]["status"] == "down", checks
        assert checks[check]["duration_ms"] < 6000  # a down dependency is reported quickly
    finally:
        fault_infra.start_server(server)
    wait_for_health_status(url, 200, 60)
