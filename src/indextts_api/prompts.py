"""Audio prompts (speaker and emotion references): fetched, checked, and stored content-addressed.

A prompt comes from an http(s) URL (bounded download) or from a path inside PROMPT_DIR (resolved,
no escape through ``..`` or symlinks). Either way it is decoded to prove it is audio within the
duration bounds and written as a mono 16-bit WAV named by the hash of its source bytes: the same
voice always has the same path, which is what IndexTTS2's path-keyed speaker cache needs, and a
path is never reused for different audio.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile

from indextts_api.config import Settings
from indextts_api.schemas import is_url

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 1024
MIN_PROMPT_SECONDS = 0.3
CACHE_MAX_FILES = 256


class PromptError(Exception):
    """The prompt cannot be used; the message is safe to send to the client."""


def resolve_local_prompt(prompt_dir: Path, reference: str) -> Path:
    """``reference`` as a file inside ``prompt_dir``, or PromptError (no ``..``, absolute or symlink escape)."""
    root = prompt_dir.resolve()
    candidate = Path(reference)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise PromptError(f"prompt path {reference!r} must be relative to the prompt directory")
    try:
        resolved = (root / candidate).resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise PromptError(f"prompt file {reference!r} does not exist in the prompt directory") from None
    if not resolved.is_relative_to(root):
        raise PromptError(f"prompt path {reference!r} leads outside the prompt directory")
    if not resolved.is_file():
        raise PromptError(f"prompt path {reference!r} is not a file")
    return resolved


class LocalPromptCheck:
    """Whether a prompt path is a file inside the prompt directory, remembered for a few seconds.

    Resolving a path costs a system call per component; a voice product sends the same few voice
    names thousands of times a second. A verdict at most ``ttl_s`` old is good enough here: the
    TTS worker resolves the path again, strictly, when it reads the file.
    """

    def __init__(self, prompt_dir: Path, ttl_s: float = 2.0, max_entries: int = 4096) -> None:
        self._prompt_dir = prompt_dir
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._verdicts: dict[str, tuple[float, str | None]] = {}  # reference -> (checked at, error)

    def error_for(self, reference: str) -> str | None:
        now = time.monotonic()
        remembered = self._verdicts.get(reference)
        if remembered is not None and now - remembered[0] < self._ttl_s:
            return remembered[1]
        if not self._prompt_dir.is_dir():
            error = None  # the API host may not share the workers' prompt directory; the worker checks
        else:
            try:
                resolve_local_prompt(self._prompt_dir, reference)
                error = None
            except PromptError as exc:
                error = str(exc)
        if len(self._verdicts) >= self._max_entries:
            self._verdicts.clear()
        self._verdicts[reference] = (now, error)
        return error


@dataclass
class _Fetched:
    """What a URL gave last time: its normalized file and the validators to ask whether it changed."""

    path: Path
    fetched_at: float
    etag: str | None
    last_modified: str | None


class PromptFetcher:
    """Turns a prompt reference into a checked, content-addressed WAV file on local disk.

    Thread-safe: the TTS worker prefetches the next task's prompt while the engine works.
    """

    def __init__(self, settings: Settings, http_client: httpx.Client) -> None:
        self._settings = settings
        self._http = http_client
        self.cache_dir = (settings.data_dir / "prompt-cache").resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._by_url: OrderedDict[str, _Fetched] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(self, reference: str, what: str = "spk_audio_prompt") -> Path:
        if is_url(reference):
            return self._fetch_url(reference, what)
        return self._normalize(resolve_local_prompt(self._settings.prompt_dir, reference), what)

    def _fetch_url(self, url: str, what: str) -> Path:
        with self._lock:
            known = self._by_url.get(url)
        headers: dict[str, str] = {}
        if known is not None and known.path.exists():
            if time.monotonic() - known.fetched_at < self._settings.prompt_url_cache_s:
                return known.path  # a popular voice is not downloaded for every task
            if known.etag:
                headers["If-None-Match"] = known.etag
            if known.last_modified:
                headers["If-Modified-Since"] = known.last_modified
        with self._download(url, what, headers) as (raw, response):
            if raw is None and known is not None:  # 304 Not Modified
                known.fetched_at = time.monotonic()
                return known.path
            assert raw is not None
            path = self._normalize(raw, what)
        entry = _Fetched(path, time.monotonic(), response.headers.get("etag"), response.headers.get("last-modified"))
        with self._lock:
            self._by_url[url] = entry
            self._by_url.move_to_end(url)
            while len(self._by_url) > CACHE_MAX_FILES:
                self._by_url.popitem(last=False)
        return path

    @contextlib.contextmanager
    def _download(self, url: str, what: str, headers: dict[str, str]) -> Iterator[tuple[Path | None, httpx.Response]]:
        """The body of ``url`` in a temporary file (None for 304), within the size and time bounds."""
        limit = self._settings.prompt_max_bytes
        deadline = time.monotonic() + self._settings.prompt_download_timeout_s
        fd, name = tempfile.mkstemp(prefix="download-", suffix=".audio", dir=self.cache_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    with self._http.stream("GET", url, headers=headers) as response:
                        if response.status_code == 304 and headers:
                            yield None, response
                            return
                        if response.status_code != 200:
                            raise PromptError(f"{what} download failed: HTTP {response.status_code} from {url}")
                        declared = response.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > limit:
                            raise PromptError(f"{what} is larger than {limit} bytes")
                        received = 0
                        for chunk in response.iter_bytes(_CHUNK_BYTES):
                            received += len(chunk)
                            if received > limit:
                                raise PromptError(f"{what} is larger than {limit} bytes")
                            if time.monotonic() > deadline:
                                raise httpx.ReadTimeout("total download time exceeded")
                            sink.write(chunk)
                except httpx.TimeoutException:
                    raise PromptError(f"{what} download timed out: {url}") from None
                except httpx.TooManyRedirects:
                    raise PromptError(f"{what} download followed too many redirects: {url}") from None
                except httpx.HTTPError as exc:
                    raise PromptError(f"{what} download failed: {type(exc).__name__}: {exc}") from None
            yield path, response
        finally:
            path.unlink(missing_ok=True)

    def _normalize(self, source: Path, what: str) -> Path:
        digest = _sha256(source)
        target = self.cache_dir / f"{digest}.wav"
        if target.exists():
            os.utime(target)  # keep popular voices in the bounded cache
            return target
        try:
            audio, sample_rate = soundfile.read(str(source), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise PromptError(f"{what} is not a readable audio file (WAV, FLAC, MP3, OGG): {exc}") from None
        seconds = audio.shape[0] / sample_rate if sample_rate else 0.0
        if seconds < MIN_PROMPT_SECONDS:
            raise PromptError(f"{what} is too short ({seconds:.2f} s; at least {MIN_PROMPT_SECONDS} s)")
        if seconds > self._settings.prompt_max_seconds:
            raise PromptError(
                f"{what} is too long ({seconds:.1f} s; at most {self._settings.prompt_max_seconds:.0f} s)"
            )
        mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
        fd, scratch = tempfile.mkstemp(prefix="prompt-", suffix=".wav", dir=self.cache_dir)
        os.close(fd)
        soundfile.write(scratch, np.clip(mono, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
        os.replace(scratch, target)  # atomic: concurrent workers never see a half-written prompt
        self._prune()
        return target

    def _prune(self) -> None:
        files = sorted(self.cache_dir.glob("*.wav"), key=lambda p: p.stat().st_mtime)
        for stale in files[:-CACHE_MAX_FILES]:
            stale.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
