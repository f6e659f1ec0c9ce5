"""Logging set-up for every role: one line per event, plain text (or JSON, LOG_FORMAT=json)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator

# The task a thread is working on; every log line it writes carries it (JSON: "task_uuid").
_current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_uuid", default=None)


@contextlib.contextmanager
def bind_task(task_uuid: str) -> Iterator[None]:
    token = _current_task.set(task_uuid)
    try:
        yield
    finally:
        _current_task.reset(token)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        task_uuid = _current_task.get()
        if task_uuid is not None:
            entry["task_uuid"] = task_uuid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their debug/info lines are not events of this service.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
