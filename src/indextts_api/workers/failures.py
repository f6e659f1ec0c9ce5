"""What happens when handling a message raises: decided here, once, for every worker loop.

Three kinds of failure (the dramatiq habit: one retry policy, not one per step):

- ``TransientError`` (or the broker's ``BrokerUnavailable``): the step could not complete now (the
  broker or S3 down). Nothing is wrong with the message: it is retried with capped backoff for as
  long as the outage lasts.
- ``PermanentError``: the message can never succeed (input that slipped past validation, a URL
  that cannot be built). Not retried: the worker fails the task at once (its ``give_up`` step:
  a failure webhook whose message says what was wrong).
- anything else is unexpected: it may be a transient cause no one foresaw, so it is retried
  ``UNEXPECTED_RETRIES`` times with backoff, then treated as permanent, and the message also goes
  to the dead-letter topic with its reason, for the operator.

A ``give_up`` step that itself fails is retried the same way (a broker outage while failing the
task); if it keeps failing unexpectedly, the message is dead-lettered or, at worst, skipped with
an error log: no message holds a worker or an upload slot longer than its bounded retries.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from indextts_api.kafka import BrokerUnavailable
from indextts_api.metrics import MESSAGE_FAILURES, MESSAGES_RETRYING

logger = logging.getLogger(__name__)

# Backoff between attempts of one message, capped at the last value.
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# Retries of an unexpected exception before the message is failed and dead-lettered (about 18 s
# with the backoff above: enough for a hiccup, short enough that no one waits on a poison task).
UNEXPECTED_RETRIES = 4
REASON_MAX_CHARS = 500


class TransientError(Exception):
    """The step could not complete now (broker or storage down): retry the same message later."""


# Transient wherever it is raised: a broker that did not store a message is an outage, so a step
# (dead-lettering, producing a result) need not translate it.
TRANSIENT = (TransientError, BrokerUnavailable)


class PermanentError(Exception):
    """The message can never succeed; the text is safe to show the client (no server paths)."""


Action = Literal["retry", "give_up", "skip"]


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0


def describe(exc: BaseException) -> str:
    """``Type: message``, bounded: what the logs and the dead-letter topic say about a failure."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 1] + "…"


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, TRANSIENT):
        return "transient"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "unexpected"


@dataclass(frozen=True)
class FailurePolicy:
    """The one retry policy of every loop (UNEXPECTED_ERROR_RETRIES sets ``unexpected_retries``)."""

    unexpected_retries: int = UNEXPECTED_RETRIES

    def decide(self, exc: BaseException, failures: int, giving_up: bool) -> Decision:
        """The next step after the ``failures``-th failure (0-based) of a message's handling, or
        of its ``give_up`` step when ``giving_up``."""
        delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
        if isinstance(exc, TRANSIENT):
            return Decision("retry", delay)
        if failures < self.unexpected_retries and not isinstance(exc, PermanentError):
            return Decision("retry", delay)
        return Decision("skip") if giving_up else Decision("give_up")


def client_message(exc: BaseException) -> str:
    """What the client is told when its task fails because of ``exc``."""
    if isinstance(exc, PermanentError):
        return str(exc)
    # An unexpected exception's text may hold server details: the client gets its kind only, the
    # operator the whole reason (logs, dead-letter topic).
    return f"internal error while processing the task ({type(exc).__name__}); it was set aside for the operator"


def redact_paths(text: str, directories: Iterable[Path]) -> str:
    """``text`` without this host's ``directories`` (nor its temporary directory) in it: an
    exception's message may name a file, which a client has no business seeing."""
    names = {str(Path(directory).resolve()) for directory in directories} | {tempfile.gettempdir()}
    for name in sorted(names, key=len, reverse=True):  # the longest first: a subdirectory before its parent
        text = text.replace(name, "…")
    return text


class Retrying:
    """One message being retried: counted in a metric (and a worker's heartbeat) while it lasts,
    so that a worker stuck on a message shows."""

    def __init__(self, role: str) -> None:
        self._role = role
        self.since: float | None = None
        self.reason: str | None = None

    def failed(self, exc: BaseException) -> None:
        MESSAGE_FAILURES.labels(self._role, kind_of(exc)).inc()
        if self.since is None:
            self.since = time.time()
            MESSAGES_RETRYING.labels(self._role).inc()
        self.reason = describe(exc)

    def done(self) -> None:
        if self.since is not None:
            MESSAGES_RETRYING.labels(self._role).dec()
            self.since = None
            self.reason = None
