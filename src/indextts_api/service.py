"""Running the roles: the all-in-one process tree, the API alone, a worker alone, the infrastructure alone.

Shutdown order, and why: the API stops taking requests first; then the workers get SIGTERM and
finish or hand back their in-flight task and commit; then the broker stops (it writes to the S3
server); the S3 server stops last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indextts_api import kafka
from indextts_api.config import Settings, configure
from indextts_api.engines import EngineUnavailable, describe_engine
from indextts_api.infra.embedded import EmbeddedInfra, load_or_create_credentials, start_embedded
from indextts_api.infra.process import ChildProcess, child_env

logger = logging.getLogger(__name__)

# A worker that exits with this code has a configuration problem: restarting it will not help.
EXIT_CONFIG = 78
# A TTS worker that handled TTS_WORKER_MAX_TASKS tasks exits with this code: start a fresh one now.
EXIT_RECYCLE = 75
WORKER_STOP_GRACE_S = 30.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class ConfigurationError(SystemExit):
    """A setting makes the role impossible to start; the message says which and what to do."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def require_api_credentials(settings: Settings) -> None:
    if not settings.api_username or settings.api_password is None:
        raise ConfigurationError(
            "API_USERNAME and API_PASSWORD must be set when external Kafka or S3 is configured "
            "(no default credentials outside the embedded mode)"
        )


def require_external_infra(settings: Settings, role: str) -> None:
    missing = []
    if settings.kafka_embedded:
        missing.append("KAFKA_BOOTSTRAP_SERVERS")
    if role != "api" and settings.s3_embedded:
        missing.append("S3_ENDPOINT_URL/S3_BUCKET_NAME/S3_ACCESS_KEY/S3_SECRET_KEY")
    if missing:
        raise ConfigurationError(
            f"the {role} role runs against shared infrastructure: set {', '.join(missing)} "
            "(for a local trial, `indextts-api infra` prints them; or run `indextts-api all`)"
        )


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: stop taking work, finish, commit, exit 0."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


# --- workers -----------------------------------------------------------------------------------


def run_worker(role: str) -> int:
    """``tts-worker`` or ``upload-worker`` in this process."""
    from indextts_api.config import get_settings

    settings = get_settings()
    require_external_infra(settings, role)
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
        logger.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    if role == "tts-worker":
        from indextts_api.engines import load_engine
        from indextts_api.workers.tts import run_tts_worker

        # While the engine loads (a minute, the first time), SIGTERM keeps its default action and
        # ends the process at once: it holds no task yet, and a stop must not wait for the load.
        try:
            loaded = load_engine(settings)
        except EngineUnavailable as exc:
            logger.error("%s", exc)
            return EXIT_CONFIG
        recycled = run_tts_worker(settings, loaded, stop_event_on_signals())
        return EXIT_RECYCLE if recycled else 0
    from indextts_api.workers.upload import run_upload_worker

    run_upload_worker(settings, stop_event_on_signals())
    return 0


@dataclass
class WorkerPool:
    """The worker processes of ``all``: restarted when they die, stopped with SIGTERM."""

    env: dict[str, str]
    counts: dict[str, int]
    workers: dict[str, ChildProcess] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    fatal: threading.Event = field(default_factory=threading.Event)
    # Held to start a worker and to begin stopping: no worker is started once stop() has begun.
    _spawn_lock: threading.Lock = field(default_factory=threading.Lock)

    def _spawn(self, slot: str) -> None:
        role, index = slot.rsplit("-", 1)
        argv = [sys.executable, "-m", "indextts_api", role]
        with self._spawn_lock:
            if self.stopping.is_set():
                return
            # WORKER_INDEX: on a host with several GPUs, TTS worker N takes GPU N modulo their number.
            self.workers[slot] = ChildProcess(slot, argv, None, env={**self.env, "WORKER_INDEX": index})

    def start(self) -> None:
        for role, count in self.counts.items():
            for index in range(count):
                self._spawn(f"{role}-{index}")
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            for slot, child in list(self.workers.items()):
                code = child.proc.poll()
                if code is None or self.stopping.is_set():
                    continue
                from indextts_api.metrics import process_exited

                process_exited(child.pid)
                if code == EXIT_CONFIG:
                    logger.error("%s cannot run with this configuration; stopping the service", slot)
                    self.fatal.set()
                    return
                if code == EXIT_RECYCLE:
                    logger.info("%s reached TTS_WORKER_MAX_TASKS; starting a fresh one", slot)
                    self._spawn(slot)
                    continue
                attempt = self.restarts.get(slot, 0)
                self.restarts[slot] = attempt + 1
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                logger.warning("%s exited with code %s; restarting in %.0f s", slot, code, delay)
                if self.stopping.wait(delay):
                    return
                self._spawn(slot)

    def stop(self) -> None:
        started = time.monotonic()
        with self._spawn_lock:
            self.stopping.set()
            children = list(self.workers.values())
        for child in children:
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE_S
        for child in children:
            child.stop(grace_s=max(0.1, deadline - time.monotonic()))
        logger.info("workers stopped in %.1f s", time.monotonic() - started)


# --- all-in-one ----------------------------------------------------------------------------------


def _with_infrastructure(settings: Settings, overrides: dict[str, Any], infra: EmbeddedInfra) -> Settings:
    """Settings pointing at the embedded servers, keeping the decisions that depend on embedded mode."""
    resolved: dict[str, Any] = {
        **overrides,
        "s3_presign": settings.presign_urls,
        "allow_private_urls": settings.private_urls_allowed,
    }
    resolved.update({key.lower(): value for key, value in infra.settings_env().items()})
    if settings.fully_embedded and (not settings.api_username or settings.api_password is None):
        resolved["api_username"] = infra.credentials.api_username
        resolved["api_password"] = infra.credentials.api_password
    return configure(**resolved)


def _start_embedded_or_exit(settings: Settings, *, need_kafka: bool, need_s3: bool) -> EmbeddedInfra:
    try:
        return start_embedded(settings, need_kafka=need_kafka, need_s3=need_s3)
    except (RuntimeError, TimeoutError) as exc:
        raise ConfigurationError(str(exc)) from None


def prepare_infrastructure(settings: Settings) -> None:
    """Topics and bucket exist before any role uses them."""
    from indextts_api.storage import AudioStore, make_s3_client

    kafka.ensure_topics(settings)
    AudioStore(settings, make_s3_client(settings)).ensure_bucket()


def banner(settings: Settings, infra: EmbeddedInfra, fresh_credentials: bool) -> str:
    engine = describe_engine(settings)
    why = f" (auto: {engine.fallback_reason})" if engine.fallback_reason else ""
    kafka_where = f"{settings.kafka_bootstrap_servers}" + (" (embedded Tansu)" if infra.kafka_port else "")
    s3_where = f"{settings.s3_endpoint_url or 'AWS S3'} bucket {settings.bucket}" + (
        " (embedded SeaweedFS)" if infra.bucket else ""
    )
    lines = [
        "IndexTTS API is ready",
        f"  API      http://{settings.host}:{settings.port}   (OpenAPI docs: /docs)",
        f"  Engine   {engine.name} {engine.model_version}{why}",
        f"  Kafka    {kafka_where}",
        f"  S3       {s3_where}",
        f"  Workers  {settings.tts_workers} TTS, {settings.upload_workers} upload",
    ]
    if infra.children:
        lines.append(f"  Data     {infra.data_dir}")
    if fresh_credentials and settings.api_password is not None:
        password = settings.api_password.get_secret_value()
        lines.append(
            f"  Login    {settings.api_username} / {password}"
            "   (generated now, shown once; kept in data/embedded-credentials.json)"
        )
    elif settings.fully_embedded:
        lines.append(f"  Login    {settings.api_username} / (see {infra.data_dir / 'embedded-credentials.json'})")
    return "\n".join(lines)


def run_all(overrides: dict[str, Any]) -> int:
    """API + workers (+ embedded infrastructure for what is not configured), in one process tree."""
    from indextts_api.config import get_settings

    settings = get_settings()
    if not settings.fully_embedded:
        require_api_credentials(settings)
    # Every process of the tree writes its metrics here; the API's /metrics adds them up.
    # (prometheus-client reads this variable when it is first imported, hence before any import.)
    metrics_dir = settings.data_dir.resolve() / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # counters of a previous run
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    credentials_file = settings.data_dir / "embedded-credentials.json"
    fresh_credentials = settings.fully_embedded and not credentials_file.exists() and not settings.api_password
    if settings.fully_embedded:
        load_or_create_credentials(settings.data_dir.resolve())
    infra = _start_embedded_or_exit(settings, need_kafka=settings.kafka_embedded, need_s3=settings.s3_embedded)
    pool: WorkerPool | None = None
    try:
        settings = _with_infrastructure(settings, overrides, infra)
        prepare_infrastructure(settings)
        pool = WorkerPool(
            env=child_env({**settings.to_env(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}),
            counts={"tts-worker": settings.tts_workers, "upload-worker": settings.upload_workers},
        )
        pool.start()
        return _serve_api(
            settings, on_ready=lambda: print(banner(settings, infra, fresh_credentials), flush=True), fatal=pool.fatal
        )
    finally:
        if pool is not None:
            pool.stop()
        infra.stop()


def run_api() -> int:
    from indextts_api.config import get_settings

    settings = get_settings()
    require_external_infra(settings, "api")
    require_api_credentials(settings)
    try:
        kafka.ensure_topics(settings, timeout_s=10)
    except Exception as exc:  # noqa: BLE001 - the API still starts; /generate answers 503 meanwhile
        logger.warning("could not check the topics (%s); continuing", exc)
    return _serve_api(settings, on_ready=lambda: logger.info("API listening on %s:%d", settings.host, settings.port))


def _serve_api(settings: Settings, on_ready: Any, fatal: threading.Event | None = None) -> int:
    import uvicorn

    from indextts_api.api import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Our own handlers below: uvicorn's re-raise the signal after shutdown, which would
            # kill this process before it stops the workers and the embedded servers in order.
            yield

    server = Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=False,
            log_config=None,  # keep our own logging set-up
            timeout_graceful_shutdown=10,
        )
    )
    stop = stop_event_on_signals()

    def announce_and_watch() -> None:
        while not server.started and not server.should_exit and not stop.is_set():
            time.sleep(0.05)
        if server.started:
            on_ready()
        while not stop.wait(0.2):
            if fatal is not None and fatal.is_set():
                break
        server.should_exit = True

    threading.Thread(target=announce_and_watch, name="api-watch", daemon=True).start()
    server.run()
    if fatal is not None and fatal.is_set():
        return 1
    return 0 if server.started else 1


# --- infrastructure only -----------------------------------------------------------------------------


def run_infra(overrides: dict[str, Any]) -> int:
    """Embedded Kafka + S3 only; prints the settings that point the other roles at them."""
    from indextts_api.config import get_settings

    settings = get_settings()
    stop = stop_event_on_signals()
    infra = _start_embedded_or_exit(settings, need_kafka=True, need_s3=True)
    try:
        configured = configure(**{**overrides, **{k.lower(): v for k, v in infra.settings_env().items()}})
        prepare_infrastructure(configured)
        for key, value in infra.settings_env().items():
            print(f"{key}={value}", flush=True)
        logger.info("embedded infrastructure running; data in %s", Path(infra.data_dir))
        while not stop.wait(1.0):
            dead = infra.check_alive()
            if dead:
                logger.error("embedded server(s) died: %s", ", ".join(dead))
                return 1
        return 0
    finally:
        infra.stop()
