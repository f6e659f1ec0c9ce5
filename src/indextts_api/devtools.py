"""Development helpers: a real webhook receiver for trying the service, and the pieces the tests
and the benchmark share to run the service (embedded servers, health wait, child processes).

python -m indextts_api.devtools --port 9000     # prints every webhook it receives
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from indextts_api.config import Settings
from indextts_api.infra.embedded import EmbeddedInfra, start_embedded
from indextts_api.infra.process import ChildProcess


@dataclass
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    answered: int = 200  # the status code the receiver answered with

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class WebhookReceiver:
    """An HTTP server on loopback that records POSTs. ``script(path, codes, delay_s)`` makes it answer
    the next requests to ``path`` with those status codes, after a delay (a slow receiver)."""

    host: str = "127.0.0.1"
    port: int = 0
    echo: bool = False
    received: list[ReceivedWebhook] = field(default_factory=list)
    status_codes: dict[str, list[int]] = field(default_factory=dict)
    delays_s: dict[str, float] = field(default_factory=dict)

    def script(self, path: str, codes: list[int] | None = None, delay_s: float = 0.0) -> None:
        with self._lock:
            self.status_codes[path] = list(codes or [])
            self.delays_s[path] = delay_s

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    scripted = receiver.status_codes.get(self.path)
                    code = scripted.pop(0) if scripted else 200
                    delay = receiver.delays_s.get(self.path, 0.0)
                time.sleep(delay)
                hook = ReceivedWebhook(self.path, dict(self.headers.items()), body, time.time(), code)
                with receiver._lock:
                    receiver.received.append(hook)
                    receiver._lock.notify_all()
                if receiver.echo:
                    print(json.dumps({"path": hook.path, "status": code, "body": hook.payload}), flush=True)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def wait_for(
        self, task_uuid: str, timeout_s: float = 60.0, count: int = 1, delivered: bool = True
    ) -> list[ReceivedWebhook]:
        """The requests received for ``task_uuid`` once ``count`` of them were answered 2xx (or, with
        ``delivered=False``, once there are ``count`` of them at all); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                hooks = [h for h in self.received if h.payload.get("task_uuid") == task_uuid]
                counted = [h for h in hooks if 200 <= h.answered < 300] if delivered else hooks
                if len(counted) >= count:
                    return counted if delivered else hooks
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no webhook for task {task_uuid} within {timeout_s:.0f} s")
                self._lock.wait(remaining)


@contextlib.contextmanager
def embedded_servers(data_dir: Path) -> Iterator[EmbeddedInfra]:
    """The embedded Tansu and SeaweedFS, on free ports, with their data in ``data_dir``."""
    settings = Settings(_env_file=None, data_dir=data_dir, embedded_kafka_port=0, embedded_s3_port=0)  # type: ignore[call-arg]
    servers = start_embedded(settings, need_kafka=True, need_s3=True)
    try:
        yield servers
    finally:
        servers.stop()


def wait_for_health(base_url: str, process: ChildProcess, timeout_s: float, healthy: bool = True) -> None:
    """Until /health answers 200 (or, with ``healthy=False``, answers at all: an API without workers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"service exited with {process.proc.returncode}:\n{process.log_tail(6000)}")
        try:
            code = httpx.get(f"{base_url}/health", timeout=5).status_code
            if code == 200 or (not healthy and code == 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"service not healthy within {timeout_s} s:\n{process.log_tail(6000)}")


def child_processes(parent_pid: int) -> dict[int, list[bytes]]:
    """The processes ``parent_pid`` started (the roles of `indextts-api all`): PID -> argv."""
    children: dict[int, list[bytes]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent_pid:
            children[int(proc.name)] = argv
    return children


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the webhooks the service sends")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    receiver = WebhookReceiver(args.host, args.port, echo=True).start()
    print(f"listening for webhooks on {receiver.url('/')}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
