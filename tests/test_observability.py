"""Task status API, metrics and logs, through the running service."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid

import httpx
from prometheus_client import REGISTRY

from indextts_api.devtools import WebhookReceiver
from indextts_api.infra.embedded import EmbeddedInfra
from indextts_api.logs import _JsonFormatter, bind_task
from indextts_api.metrics import LagMonitor
from tests.conftest import FileServer, Service
from tests.test_consumer_loop import backlog_topic
from tests.test_pipeline import WEBHOOK_TIMEOUT_S, fetch_wav, submit

ORDER = ["queued", "processing", "uploading", "success"]


def watch_status(api: httpx.Client, task_uuid: str, until: set[str], timeout_s: float) -> list[dict[str, object]]:
    """Every distinct state GET /tasks/{id} showed, until one in ``until``."""
    seen: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = api.get(f"/tasks/{task_uuid}")
        assert response.status_code == 200, response.text
        body = response.json()
        if not seen or seen[-1]["status"] != body["status"]:
            seen.append(body)
        if body["status"] in until:
            return seen
        time.sleep(0.02)
    raise TimeoutError(f"task {task_uuid} still {seen[-1]['status'] if seen else '?'}")


def test_status_goes_from_queued_to_success(api: httpx.Client, receiver: WebhookReceiver) -> None:
    # A long task keeps the one TTS worker busy, so the next one is visibly queued first.
    submit(api, receiver, "example.wav", text="Keep the worker busy for a few seconds. " * 12)
    task_uuid = submit(api, receiver, "example.wav", text="Wait for your turn, then speak. " * 6)
    seen = watch_status(api, task_uuid, {"success", "failed"}, 120)
    statuses = [str(state["status"]) for state in seen]
    assert statuses[0] == "queued" and statuses[-1] == "success", statuses
    assert "processing" in statuses
    assert [ORDER.index(s) for s in statuses] == sorted(ORDER.index(s) for s in statuses)  # never backwards
    final = seen[-1]
    assert final["task_uuid"] == task_uuid
    created, started, finished = final["created_at"], final["started_at"], final["finished_at"]
    assert isinstance(created, float) and isinstance(started, float) and isinstance(finished, float)
    assert created <= started <= finished
    timings = final["timings"]
    assert isinstance(timings, dict) and timings["synthesis_s"] > 0 and timings["audio_s"] > 1
    assert final["engine"] == "piper"
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    webhook = api.get(f"/tasks/{task_uuid}").json()["webhook"]
    assert webhook["delivered"] is True and webhook["attempts"] == 1 and webhook["last_status_code"] == 200
    # The result can be recovered here without the webhook.
    audio, rate, _ = fetch_wav(str(final["s3_url"]))
    assert len(audio) / rate > 1
    assert hook.payload["s3_url"].split("?")[0] == str(final["s3_url"]).split("?")[0]


def test_status_agrees_with_the_webhook_the_moment_it_arrives(api: httpx.Client, receiver: WebhookReceiver) -> None:
    # A short task leaves no "processing" record (steps under 0.25 s are not recorded); its final
    # record, written before the webhook is sent, carries when it started.
    task_uuid = submit(api, receiver, "example.wav", text="Short and quick.")
    [hook] = receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    state = api.get(f"/tasks/{task_uuid}").json()
    assert state["status"] == hook.payload["status"] == "success"
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]
    assert state["timings"]["synthesis_s"] > 0
    # That record is the audio object's metadata, stored by the upload itself (no write of its own).
    _, _, response = fetch_wav(hook.payload["s3_url"])
    recorded = json.loads(response.headers["x-amz-meta-indextts-outcome"])
    assert recorded["status"] == "success" and recorded["timings"]["synthesis_s"] == state["timings"]["synthesis_s"]
    # The upload's duration comes with the delivery record, written right after the webhook.
    deadline = time.monotonic() + 10
    while state["webhook"]["attempts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        state = api.get(f"/tasks/{task_uuid}").json()
    assert state["webhook"]["delivered"] is True and state["timings"]["upload_s"] > 0


def test_failed_task_shows_its_error(api: httpx.Client, receiver: WebhookReceiver, file_server: FileServer) -> None:
    task_uuid = submit(api, receiver, file_server.url("missing-voice.wav"))
    seen = watch_status(api, task_uuid, {"success", "failed"}, 60)
    assert seen[-1]["status"] == "failed"
    assert "404" in str(seen[-1]["error_message"])
    assert seen[-1]["s3_url"] is None


def test_unknown_task_is_404_and_auth_is_required(api: httpx.Client, service: Service) -> None:
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "00000000-0000-7000-8000-000000000000"):
        response = api.get(f"/tasks/{unknown}")
        assert response.status_code == 404
        assert response.json() == {"error": "no such task"}
    response = httpx.get(f"{service.base_url}/tasks/{uuid.uuid4()}", timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")


def test_health_reports_each_dependency(service: Service) -> None:
    response = httpx.get(f"{service.base_url}/health", timeout=10)
    body = response.json()
    assert response.status_code == 200
    assert {"status", "timestamp", "model_version", "engine", "checks"} <= set(body)
    assert set(body["checks"]) == {"kafka", "s3", "engine"}
    for check in body["checks"].values():
        assert check["status"] == "up" and check["duration_ms"] >= 0
    assert "TTS worker" in body["checks"]["engine"]["detail"]


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head, value = line.rsplit(" ", 1)
            if head.split("{")[0] == name:
                total += float(value)
    return total


def test_metrics_count_a_task(api: httpx.Client, receiver: WebhookReceiver, service: Service) -> None:
    before = httpx.get(f"{service.base_url}/metrics", timeout=10).text
    task_uuid = submit(api, receiver, "example.wav", text="Count me in the metrics.")
    receiver.wait_for(task_uuid, WEBHOOK_TIMEOUT_S)
    time.sleep(0.5)  # the worker records its metrics right after the webhook
    after = httpx.get(f"{service.base_url}/metrics", timeout=10).text
    for family in (
        "indextts_tasks_accepted_total",
        "indextts_tasks_finished_total",
        "indextts_synthesis_seconds",
        "indextts_audio_seconds",
        "indextts_uploads_total",
        "indextts_upload_seconds",
        "indextts_webhook_deliveries_total",
        "indextts_tasks_in_flight",
        "indextts_kafka_consumer_lag",
        "indextts_prompt_fetch_seconds",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in after, family
    assert (
        metric_value(after, "indextts_tasks_accepted_total")
        >= metric_value(before, "indextts_tasks_accepted_total") + 1
    )
    grew = [
        ("indextts_tasks_finished_total", {"status": "success"}),
        ("indextts_synthesis_seconds_count", {"engine": "piper"}),
        ("indextts_uploads_total", {"result": "success"}),
        ("indextts_webhook_deliveries_total", {"result": "delivered", "attempt": "1"}),
    ]
    for name, labels in grew:
        assert metric_value(after, name, **labels) >= metric_value(before, name, **labels) + 1, name


def test_consumer_lag_is_measured_while_metrics_are_read(infra: EmbeddedInfra) -> None:
    # A backlog of 5 tasks no worker has read. Tansu under-reports the high watermark (DESIGN.md:
    # its ListOffsets picks a batch by modification time, to the second), so only "some lag" is sure.
    settings, topic, group = backlog_topic(infra, partitions=2, messages=5)
    settings = settings.model_copy(update={"lag_interval_s": 0.3, "kafka_tts_consumer_group": group})
    monitor = LagMonitor(settings).start()
    try:
        time.sleep(1.5)  # five intervals, no scrape: the broker is left alone
        assert monitor.measurements == 0
        monitor.wanted()  # the first scrape waits for a figure
        assert monitor.measurements >= 1
        lag = REGISTRY.get_sample_value("indextts_kafka_consumer_lag", {"topic": topic, "group": group})
        assert lag is not None and 1 <= lag <= 5
        # Scrapes stop: measurements go on for IDLE_AFTER_INTERVALS intervals at most, then stop.
        time.sleep(monitor.IDLE_AFTER_INTERVALS * 0.3 + 3.0)
        settled = monitor.measurements
        time.sleep(1.5)
        assert monitor.measurements == settled
    finally:
        monitor.stop()


def test_json_log_lines_carry_the_task() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter())
    log = logging.getLogger("indextts_api.test_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        with bind_task("1234"):
            log.warning("inside a task")
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["task_uuid"] == "1234" and inside["message"] == "inside a task"
    assert "task_uuid" not in outside
