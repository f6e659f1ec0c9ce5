"""Audio prompts (speaker and emotion references): fetched, checked, and stored content-addressed.

A prompt comes from an http(s) URL (a download bounded in bytes and, as a whole, in time) or from
a path inside PROMPT_DIR (resolved, no escape through ``..`` or symlinks). Either way its header is
checked, then it is decoded block by block, within the duration bounds, into a mono 16-bit WAV
named by the hash of its source bytes: the same voice always has the same path, which is what
IndexTTS2's path-keyed speaker cache needs, and a path is never reused for different audio. No
input costs more than one block of memory, and every refusal is a PromptError.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx
import numpy as np
import numpy.typing as npt
import soundfile

from indextts_api.config import Settings
from indextts_api.metrics import PROMPT_CACHE
from indextts_api.schemas import is_url, voice_id_of

if TYPE_CHECKING:
    from indextts_api.voices import VoiceStore

logger = logging.getLogger(__name__)

MIN_PROMPT_SECONDS = 0.3
CACHE_MAX_FILES = 256
# A voice recording has a few channels at a usual rate; the rate bounds the decoding time and the
# size of the normalized file (46 MB at the default PROMPT_MAX_SECONDS of 60, at 384 kHz).
MAX_CHANNELS = 8
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
# Frames decoded at a time: 2 MB of float32 at 8 channels, whatever the file claims.
_BLOCK_FRAMES = 64 * 1024
# libsndfile's SF_COUNT_MAX, the length it reports when the header does not state one.
_UNKNOWN_LENGTH = 2**63 - 1
# LibsndfileError is a RuntimeError; TypeError and ValueError come from formats soundfile cannot
# open without parameters; MemoryError would come from a decoder's own allocations.
_DECODE_ERRORS = (RuntimeError, TypeError, ValueError, MemoryError, OSError)
# How much of a client's reference a message repeats.
_SHOWN_CHARS = 200
_DOWNLOAD_HEADERS = {
    # The file as stored: a compressed transfer could decode to far more than was downloaded, in
    # memory, within a single chunk.
    "Accept-Encoding": "identity",
    # A connection of its own for every download, so that the watchdog sees it (see _Watchdog).
    "Connection": "close",
}


class VoiceStoreUnavailable(RuntimeError):
    """The voice storage (S3) could not answer: the task is retried, not failed."""


class PromptError(Exception):
    """The prompt cannot be used; the message is safe to send to the client: it names the problem
    and the client's own reference, never a path of this server."""


def _shown(reference: str) -> str:
    """The client's reference, quoted for a message: shortened, and ``repr`` escapes what could
    not be encoded (a lone surrogate) or displayed."""
    return repr(reference if len(reference) <= _SHOWN_CHARS else reference[:_SHOWN_CHARS] + "...")


def _reason(exc: OSError) -> str:
    """What the system said, without the file name it adds to ``str(exc)``."""
    return exc.strerror or type(exc).__name__


def resolve_local_prompt(prompt_dir: Path, reference: str) -> Path:
    """``reference`` as a file inside ``prompt_dir``, or PromptError (no ``..``, absolute or symlink escape)."""
    shown = _shown(reference)
    candidate = Path(reference)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise PromptError(f"prompt path {shown} must be relative to the prompt directory")
    try:
        root = prompt_dir.resolve()
        resolved = (root / candidate).resolve(strict=True)
        if not resolved.is_relative_to(root):
            raise PromptError(f"prompt path {shown} leads outside the prompt directory")
        if not resolved.is_file():
            raise PromptError(f"prompt path {shown} is not a file")
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a path through a file
        raise PromptError(f"prompt file {shown} does not exist in the prompt directory") from None
    except RuntimeError:  # Python 3.11's resolve() for a symlink loop (later versions: OSError ELOOP)
        raise PromptError(f"prompt path {shown} is a symlink loop") from None
    except OSError as exc:  # a name too long, a loop, a directory this server may not read
        raise PromptError(f"prompt path {shown} cannot be opened: {_reason(exc)}") from None
    except ValueError:  # an embedded NUL; UnicodeEncodeError (a lone surrogate) is a ValueError
        raise PromptError(f"prompt path {shown} holds a character no file name can hold") from None
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

    def __init__(self, settings: Settings, http_client: httpx.Client, voices: VoiceStore | None = None) -> None:
        self._settings = settings
        self._http = http_client
        self._voices = voices
        self.cache_dir = (settings.data_dir / "prompt-cache").resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._by_url: OrderedDict[str, _Fetched] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(self, reference: str, what: str = "spk_audio_prompt") -> Path:
        voice_id = voice_id_of(reference)
        if voice_id is not None:
            return self._fetch_voice(voice_id, what)
        if is_url(reference):
            return self._fetch_url(reference, what)
        return self._normalize(resolve_local_prompt(self._settings.prompt_dir, reference), what, "path")

    def _fetch_voice(self, voice_id: str, what: str) -> Path:
        """A registered voice, from S3 the first time, then from this host's cache. Whether it still
        exists is asked every time (one HEAD, during the previous task's synthesis): a task waiting
        for a voice deleted meanwhile fails instead of using a cached copy."""
        if self._voices is None:
            raise PromptError(f"{what}: this worker cannot read registered voices")
        try:
            registered = self._voices.exists(voice_id)
        except Exception as exc:
            raise VoiceStoreUnavailable(f"voice storage unavailable: {exc}") from exc
        target = self.cache_dir / f"voice-{voice_id}.wav"  # the id is the audio's hash: never stale
        if not registered:
            target.unlink(missing_ok=True)
            raise PromptError(f"{what}: voice {voice_id} does not exist (it was deleted, or never registered)")
        with contextlib.suppress(FileNotFoundError):
            os.utime(target)
            PROMPT_CACHE.labels("voice", "hit").inc()
            return target
        fd, name = tempfile.mkstemp(prefix="voice-", suffix=".wav.part", dir=self.cache_dir)
        scratch = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    found = self._voices.download_audio(voice_id, sink)
                except Exception as exc:
                    raise VoiceStoreUnavailable(f"voice storage unavailable: {exc}") from exc
            if not found:
                raise PromptError(f"{what}: voice {voice_id} does not exist (it was deleted, or never registered)")
            os.replace(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)
        PROMPT_CACHE.labels("voice", "miss").inc()
        self._prune()
        return target

    def _fetch_url(self, url: str, what: str) -> Path:
        with self._lock:
            known = self._by_url.get(url)
        validators: dict[str, str] = {}
        if known is not None and known.path.exists():
            if time.monotonic() - known.fetched_at < self._settings.prompt_url_cache_s:
                PROMPT_CACHE.labels("url", "hit").inc()
                return known.path  # a popular voice is not downloaded for every task
            if known.etag:
                validators["If-None-Match"] = known.etag
            if known.last_modified:
                validators["If-Modified-Since"] = known.last_modified
        fd, name = tempfile.mkstemp(prefix="download-", suffix=".audio", dir=self.cache_dir)
        body = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                answer = download(self._http, self._settings, url, what, sink, validators)
            if answer is None:  # 304 Not Modified, asked only with the validators of a known entry
                assert known is not None
                known.fetched_at = time.monotonic()
                PROMPT_CACHE.labels("url", "hit").inc()
                return known.path
            path = self._normalize(body, what, "url")
        finally:
            body.unlink(missing_ok=True)
        entry = _Fetched(
            path, time.monotonic(), _validator(answer.get("etag")), _validator(answer.get("last-modified"))
        )
        with self._lock:
            self._by_url[url] = entry
            self._by_url.move_to_end(url)
            while len(self._by_url) > CACHE_MAX_FILES:
                self._by_url.popitem(last=False)
        return path

    def _normalize(self, source: Path, what: str, kind: str) -> Path:
        try:
            digest = _sha256(source)
        except OSError as exc:
            raise PromptError(f"{what} cannot be read: {_reason(exc)}") from None
        target = self.cache_dir / f"{digest}.wav"
        with contextlib.suppress(FileNotFoundError):  # missing (or just pruned by another worker): make it
            os.utime(target)  # keep popular voices in the bounded cache
            PROMPT_CACHE.labels(kind, "hit").inc()
            return target
        PROMPT_CACHE.labels(kind, "miss").inc()
        # Not named *.wav until complete: _prune (of any worker sharing the directory) skips it.
        fd, name = tempfile.mkstemp(prefix="prompt-", suffix=".wav.part", dir=self.cache_dir)
        os.close(fd)
        scratch = Path(name)
        try:
            self._transcode(source, scratch, what)
            os.replace(scratch, target)  # atomic: concurrent workers never see a half-written prompt
        finally:
            scratch.unlink(missing_ok=True)
        self._prune()
        return target

    def _transcode(self, source: Path, scratch: Path, what: str) -> None:
        """``source`` as a mono 16-bit WAV at ``scratch``, decoded block by block within the
        duration bounds: memory stays at one block whatever the file holds or its header claims."""
        max_seconds = self._settings.prompt_max_seconds
        with open_audio(source, what, max_seconds) as audio:
            rate = audio.samplerate
            limit = int(max_seconds * rate)
            frames = 0
            with soundfile.SoundFile(scratch, "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as out:
                for block in mono_blocks(audio, what):
                    frames += len(block)
                    if frames > limit:
                        raise _too_long(what, max_seconds)
                    out.write(np.clip(block, -1.0, 1.0))
        seconds = frames / rate
        if seconds < MIN_PROMPT_SECONDS:
            raise PromptError(f"{what} is too short ({seconds:.2f} s; at least {MIN_PROMPT_SECONDS} s)")

    def _prune(self) -> None:
        """Keeps the newest CACHE_MAX_FILES prompts; another worker may remove files meanwhile."""
        dated: list[tuple[float, Path]] = []
        for path in self.cache_dir.glob("*.wav"):
            with contextlib.suppress(FileNotFoundError):
                dated.append((path.stat().st_mtime, path))
        for _, stale in sorted(dated)[:-CACHE_MAX_FILES]:
            stale.unlink(missing_ok=True)


def download(
    http: httpx.Client,
    settings: Settings,
    url: str,
    what: str,
    sink: BinaryIO,
    validators: dict[str, str] | None = None,
) -> httpx.Headers | None:
    """Writes the body of ``url`` to ``sink`` within PROMPT_MAX_BYTES and PROMPT_DOWNLOAD_TIMEOUT_S;
    returns the response's headers, or None for 304 Not Modified (asked with ``validators`` only)."""
    limit = settings.prompt_max_bytes
    with _Watchdog(settings.prompt_download_timeout_s) as watchdog:
        try:
            with http.stream(
                "GET", url, headers={**_DOWNLOAD_HEADERS, **(validators or {})}, extensions={"trace": watchdog.trace}
            ) as response:
                if response.status_code == 304 and validators:
                    return None
                _check_answer(response, what, url, limit)
                received = 0
                for chunk in response.iter_raw():  # each chunk as it arrives: the clock is checked often
                    received += len(chunk)
                    if received > limit:
                        raise PromptError(f"{what} is larger than {limit} bytes")
                    if watchdog.expired:
                        break
                    sink.write(chunk)
        except httpx.HTTPError as exc:
            raise _download_failure(what, url, exc, watchdog.expired) from None
        except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError (an IDNA host name) is a ValueError
            raise PromptError(f"{what} is not a URL that can be requested ({exc}): {url}") from None
        if watchdog.expired:  # the socket was shut down: what came before the cut is not the file
            raise PromptError(f"{what} download timed out: {url}")
        return response.headers


class _Watchdog:
    """Ends a download at its deadline, even while a read waits.

    httpx's read timeout counts from each read, so a server that sends a byte just before it runs
    out holds a download for as long as it likes, and a check of the clock between chunks does not
    run while a read waits. At the deadline this shuts the connection's socket down, which ends a
    waiting read at once (headers, TLS handshake or body). The socket comes from httpx's ``trace``
    extension at every connect, redirects included; ``Connection: close`` on every download makes
    sure there is a connect (a pooled connection would be reused without one). The watchdog holds
    its own duplicate of the descriptor, so it can never shut down a descriptor number that httpx
    closed meanwhile and the system gave to another socket.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._expired = threading.Event()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._forget()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        connected = info["return_value"].get_extra_info("socket")  # plain TCP: TLS wraps it later
        with self._lock:
            self._forget()
            with contextlib.suppress(OSError):  # out of descriptors: only the checks between chunks remain
                self._socket = connected.dup()
            if self.expired:
                self._shut()

    def _expire(self) -> None:
        with self._lock:
            self._expired.set()
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                self._socket.shutdown(socket.SHUT_RDWR)

    def _forget(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _check_answer(response: httpx.Response, what: str, url: str, limit: int) -> None:
    """Refuses a response whose status or headers already say it cannot be a usable prompt."""
    if response.status_code != 200:
        raise PromptError(f"{what} download failed: HTTP {response.status_code} from {url}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise PromptError(f"{what} was sent {encoding}-encoded although the file was asked for as is: {url}")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PromptError(f"{what} is larger than {limit} bytes")


def _download_failure(what: str, url: str, exc: httpx.HTTPError, expired: bool) -> PromptError:
    if expired or isinstance(exc, httpx.TimeoutException):
        return PromptError(f"{what} download timed out: {url}")
    if isinstance(exc, httpx.TooManyRedirects):
        return PromptError(f"{what} download followed too many redirects: {url}")
    return PromptError(f"{what} download failed: {type(exc).__name__}: {exc}")


def _validator(value: str | None) -> str | None:
    """``value`` (an ETag or Last-Modified) if a request header can carry it back: an odd one
    must not make every later request for that URL fail."""
    return value if value is not None and value.isascii() and value.isprintable() else None


def open_audio(source: Path, what: str, max_seconds: float) -> soundfile.SoundFile:
    """``source`` opened for decoding, after what its header says was checked."""
    try:
        audio = soundfile.SoundFile(str(source))
    except _DECODE_ERRORS as exc:
        raise _unreadable(what, exc) from None
    try:
        _check_header(audio, what, max_seconds)
    except PromptError:
        audio.close()
        raise
    return audio


def _check_header(audio: soundfile.SoundFile, what: str, max_seconds: float) -> None:
    """Refuses from the header alone what cannot be a voice prompt, before any sample is decoded."""
    if not 0 < audio.channels <= MAX_CHANNELS:
        raise PromptError(f"{what} has {audio.channels} channels (1 to {MAX_CHANNELS} accepted)")
    if not MIN_SAMPLE_RATE <= audio.samplerate <= MAX_SAMPLE_RATE:
        raise PromptError(
            f"{what} has a sample rate of {audio.samplerate} Hz ({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz accepted)"
        )
    # An MP3's length is an estimate (exact only with a Xing/LAME header) and an unknown length
    # reads as SF_COUNT_MAX: for those the decoded count decides. A length the header states is
    # enough to refuse a two-hour file without decoding a sample of it.
    stated = audio.frames
    if audio.format != "MP3" and stated < _UNKNOWN_LENGTH and stated > max_seconds * audio.samplerate:
        raise _too_long(what, max_seconds, stated / audio.samplerate)


def mono_blocks(audio: soundfile.SoundFile, what: str) -> Iterator[npt.NDArray[np.float32]]:
    """The decoded audio, mixed down to mono, ``_BLOCK_FRAMES`` at a time, until the decoder stops
    (which is where the data ends, whatever the header said)."""
    while True:
        try:
            block = audio.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
        except _DECODE_ERRORS as exc:
            raise _unreadable(what, exc) from None
        if not len(block):
            return
        yield block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]


def _unreadable(what: str, exc: BaseException) -> PromptError:
    # soundfile's own message starts with the file's path on this server; libsndfile's error
    # string says what is wrong without it.
    detail = exc.error_string if isinstance(exc, soundfile.LibsndfileError) else type(exc).__name__
    return PromptError(f"{what} is not a readable audio file (WAV, FLAC, MP3, OGG): {detail}")


def _too_long(what: str, max_seconds: float, seconds: float | None = None) -> PromptError:
    length = f"{seconds:.1f} s; " if seconds is not None else ""
    return PromptError(f"{what} is too long ({length}at most {max_seconds:g} s)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
