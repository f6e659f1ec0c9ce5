"""Bounded work per task: a prompt in time and memory, a text in segment size; every refusal a
PromptError whose message names the problem and never a path of this server.

Prompts are fetched with the real PromptFetcher and HTTP client against a local server that
misbehaves on purpose; memory is measured in a child process, so that pytest's own does not count.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from indextts_api.config import Settings
from indextts_api.engines.segments import MAX_SEGMENT_CHARS, MAX_TOKEN_CHARS, split_text, tokenize
from indextts_api.httpclient import make_http_client
from indextts_api.prompts import LocalPromptCheck, PromptError, PromptFetcher, resolve_local_prompt
from tests.conftest import ROOT, speech_like_wav

# A drip server gives up after this long, so that no thread of it outlives the test much.
DRIP_MAX_S = 30.0
# Peak memory a prompt may add to the process that fetches it (unbounded before: +1.2 GB for a
# two-hour FLAC, MemoryError for a header claiming 2^36 samples).
MAX_PROMPT_GROWTH_MB = 200


# --- a prompt server that misbehaves -------------------------------------------------------------


class _Misbehaving(BaseHTTPRequestHandler):
    """``/drip/<s>``: headers at once, then the body one byte every <s> seconds.
    ``/drip-headers/<s>``: the status line, then the headers one byte every <s> seconds.
    ``/redirect/<path>``: a redirect to ``/<path>``.
    ``/gzip/<name>``, ``/odd-etag/<name>``, ``/file/<name>``: a file of ``files`` gzip-encoded, with
    an ETag no request header can carry back, or as it is."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes]

    def do_GET(self) -> None:
        kind, _, arg = self.path.lstrip("/").partition("/")
        if kind == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self._drip(b"x" * 100_000, float(arg))
        elif kind == "drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"y" * 100_000, float(arg))
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/{arg}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind in ("gzip", "odd-etag", "file"):
            body = self.files[arg]
            self.send_response(200)
            if kind == "gzip":
                body = gzip.compress(body)
                self.send_header("Content-Encoding", "gzip")
            if kind == "odd-etag":
                self.send_header("ETag", '"caf\xe9"')  # sent as Latin-1, as http.server does
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def _drip(self, data: bytes, interval_s: float) -> None:
        started = time.monotonic()
        for byte in data:
            if time.monotonic() - started > DRIP_MAX_S:
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up, as it should
                break
            time.sleep(interval_s)
        self.close_connection = True

    def log_message(self, *_args: Any) -> None:
        pass


class MisbehavingServer:
    def __init__(self, port: int, files: dict[str, bytes]) -> None:
        self.port = port
        self.files = files

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"


@contextlib.contextmanager
def misbehaving_server() -> Iterator[MisbehavingServer]:
    files: dict[str, bytes] = {}
    handler = type("Handler", (_Misbehaving,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield MisbehavingServer(server.server_address[1], files)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[MisbehavingServer]:
    with misbehaving_server() as running:
        running.files["voice.wav"] = (ROOT / "prompts" / "example.wav").read_bytes()
        running.files["junk.wav"] = b"RIFF this is not audio" * 100
        yield running


@pytest.fixture
def prompt_root(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    root.mkdir()
    shutil.copy(ROOT / "prompts" / "example.wav", root / "example.wav")
    (root / "junk.wav").write_bytes(b"RIFF this is not audio" * 100)
    return root


FetcherFactory = Callable[..., PromptFetcher]


@pytest.fixture
def make_fetcher(tmp_path: Path, prompt_root: Path) -> Iterator[FetcherFactory]:
    """PromptFetchers as the TTS worker builds them, with the given settings."""
    clients: list[httpx.Client] = []

    def make(**values: Any) -> PromptFetcher:
        settings = Settings(_env_file=None, data_dir=tmp_path / "data", prompt_dir=prompt_root, **values)
        http = make_http_client(
            connect_timeout_s=settings.prompt_connect_timeout_s,
            read_timeout_s=settings.prompt_read_timeout_s,
            max_redirects=settings.prompt_max_redirects,
            allow_private=True,
        )
        clients.append(http)
        return PromptFetcher(settings, http)

    yield make
    for client in clients:
        client.close()


def assert_no_server_path(message: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in message, message
        assert str(path.resolve()) not in message, message


# --- downloads: a hard deadline, clean failures ------------------------------------------------------

DEADLINE_S = 2.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "path",
    [
        "drip/0.2",  # bytes often: each chunk is checked as it arrives
        "drip/6",  # a byte just before the 8 s read timeout: only the watchdog ends the wait
        "drip-headers/6",  # the same while the headers arrive
        "redirect/drip/6",  # the same on the connection a redirect opens
    ],
)
def test_download_deadline_holds_against_a_drip(
    make_fetcher: FetcherFactory, server: MisbehavingServer, path: str
) -> None:
    fetcher = make_fetcher(prompt_download_timeout_s=DEADLINE_S, prompt_read_timeout_s=8)
    started = time.monotonic()
    with pytest.raises(PromptError, match="download timed out"):
        fetcher.fetch(server.url(path))
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + 1.5, f"{path}: failed after {elapsed:.1f} s"
    assert list(fetcher.cache_dir.iterdir()) == []  # the partial download is gone


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://voices..example.com/voice.wav", "label empty or too long"),  # UnicodeError from IDNA
        ("http://[::1/voice.wav", "Invalid port"),  # httpx.InvalidURL
        ("http://exa\x00mple.com/voice.wav", "non-printable"),  # httpx.InvalidURL
        ("http://xn--zz.example.com/voice.wav", "A-label"),  # idna.IDNAError
    ],
)
def test_url_that_cannot_be_requested_is_a_prompt_error(make_fetcher: FetcherFactory, url: str, reason: str) -> None:
    with pytest.raises(PromptError, match="not a URL that can be requested") as raised:
        make_fetcher().fetch(url)
    assert reason in str(raised.value)


@pytest.mark.timeout(30)
def test_validator_no_header_can_carry_is_not_sent_back(
    make_fetcher: FetcherFactory, server: MisbehavingServer
) -> None:
    """An ETag outside ASCII would make every revalidation of the URL fail (UnicodeEncodeError)."""
    fetcher = make_fetcher(prompt_url_cache_s=0)
    first = fetcher.fetch(server.url("odd-etag/voice.wav"))
    assert fetcher.fetch(server.url("odd-etag/voice.wav")) == first


@pytest.mark.timeout(30)
def test_compressed_transfer_is_refused(make_fetcher: FetcherFactory, server: MisbehavingServer) -> None:
    with pytest.raises(PromptError, match="gzip-encoded"):
        make_fetcher().fetch(server.url("gzip/voice.wav"))


@pytest.mark.timeout(30)
def test_download_sends_identity_and_a_fresh_connection(
    make_fetcher: FetcherFactory, server: MisbehavingServer
) -> None:
    """What the deadline relies on: each download on a connection of its own (see _Watchdog)."""
    seen: list[httpx.Request] = []
    fetcher = make_fetcher()
    fetcher._http.event_hooks["request"].append(seen.append)
    fetcher.fetch(server.url("file/voice.wav"))
    assert seen[0].headers["Connection"] == "close"
    assert seen[0].headers["Accept-Encoding"] == "identity"


# --- local paths the file system refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("example.wav/x.wav", "does not exist"),  # ENOTDIR: a path through a regular file
        ("a" * 300 + ".wav", "File name too long"),  # ENAMETOOLONG
        ("loop.wav", "symlink loop|symbolic links"),  # ELOOP (RuntimeError on Python 3.11)
        ("x\x00.wav", "character no file name can hold"),  # ValueError: embedded null byte
        ("\ud800.wav", "character no file name can hold"),  # UnicodeEncodeError: a lone surrogate
    ],
)
def test_local_path_the_system_refuses_is_a_prompt_error(prompt_root: Path, reference: str, reason: str) -> None:
    (prompt_root / "loop.wav").symlink_to(prompt_root / "loop.wav")
    with pytest.raises(PromptError, match=reason) as raised:
        resolve_local_prompt(prompt_root, reference)
    assert_no_server_path(str(raised.value), prompt_root)
    assert len(str(raised.value)) < 400  # a long reference is shortened, not repeated whole
    # The API's check says the same, instead of failing the request.
    assert LocalPromptCheck(prompt_root).error_for(reference) == str(raised.value)


def test_any_os_error_is_a_prompt_error_without_the_path(prompt_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES cannot be produced here (the tests may run as root); any OSError is handled alike."""
    secret = str(prompt_root / "locked" / "a.wav")

    def denied(self: Path, strict: bool = False) -> Path:
        raise PermissionError(13, "Permission denied", secret)

    monkeypatch.setattr(Path, "resolve", denied)
    with pytest.raises(PromptError, match="cannot be opened: Permission denied") as raised:
        resolve_local_prompt(prompt_root, "locked/a.wav")
    monkeypatch.undo()
    assert_no_server_path(str(raised.value), prompt_root)


def test_unreadable_local_file_is_a_prompt_error(make_fetcher: FetcherFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    fetcher = make_fetcher()

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(PromptError, match="cannot be read: Permission denied") as raised:
        fetcher.fetch("example.wav")
    monkeypatch.undo()
    assert_no_server_path(str(raised.value), fetcher.cache_dir, fetcher.cache_dir.parent.parent)


# --- messages safe to show a client -------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reference", ["junk.wav", "nope.wav", "example.wav/x.wav", "url:file/junk.wav"])
def test_failure_message_names_no_server_path(
    make_fetcher: FetcherFactory, server: MisbehavingServer, prompt_root: Path, tmp_path: Path, reference: str
) -> None:
    fetcher = make_fetcher()
    if reference.startswith("url:"):
        reference = server.url(reference.removeprefix("url:"))
    with pytest.raises(PromptError) as raised:
        fetcher.fetch(reference)
    assert_no_server_path(str(raised.value), tmp_path, prompt_root, fetcher.cache_dir)
    if reference.endswith("junk.wav"):
        assert str(raised.value).endswith("not a readable audio file (WAV, FLAC, MP3, OGG): Format not recognised.")


# --- decoding: header first, then bounded blocks -----------------------------------------------------------

MAX_SECONDS = 30.0


def silent_flac(path: Path, seconds: int, sample_rate: int = 16000) -> Path:
    """Hours of silence compress to a few hundred KB; written a minute at a time."""
    minute = np.zeros(sample_rate * 60, dtype=np.int16)
    with soundfile.SoundFile(path, "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="FLAC") as out:
        for _ in range(seconds // 60):
            out.write(minute)
    return path


def flac_stating_frames(source: Path, target: Path, frames: int) -> Path:
    """``source`` with STREAMINFO's 36-bit total sample count set to ``frames`` (0: unknown)."""
    data = bytearray(source.read_bytes())
    field = slice(18, 26)  # "fLaC", block header (4), then 10 bytes before the 64 bits that end with it
    packed = int.from_bytes(data[field], "big")
    data[field] = ((packed & ~(2**36 - 1)) | frames).to_bytes(8, "big")
    target.write_bytes(data)
    return target


def wav_patched(source: Path, target: Path, *, data_bytes: int | None = None, sample_rate: int | None = None) -> Path:
    """``source`` (a canonical 44-byte-header WAV) with its data size or sample rate replaced."""
    data = bytearray(source.read_bytes())
    assert data[36:40] == b"data"
    if data_bytes is not None:
        data[40:44] = struct.pack("<I", data_bytes)
    if sample_rate is not None:
        data[24:28] = struct.pack("<I", sample_rate)
    target.write_bytes(data)
    return target


def make_hostile_prompts(root: Path) -> dict[str, str]:
    """Files that once cost a worker gigabytes or an uncaught exception -> the expected outcome."""
    two_hours = silent_flac(root / "two-hours.flac", 7200)
    flac_stating_frames(two_hours, root / "two-hours-length-unstated.flac", 0)
    flac_stating_frames(two_hours, root / "claims-2^36-samples.flac", 2**36 - 1)
    second = speech_like_wav(root / "second.wav", seconds=1.0)
    wav_patched(second, root / "claims-4-GB.wav", data_bytes=0xFFFFFFF0)
    wav_patched(second, root / "claims-2-GHz.wav", sample_rate=2_000_000_000)
    soundfile.write(root / "two-minutes.mp3", np.zeros(120 * 16000, dtype=np.float32), 16000, format="MP3")
    soundfile.write(root / "nine-channels.wav", np.zeros((16000, 9), dtype=np.float32), 16000, subtype="PCM_16")
    return {
        "two-hours.flac": "too long (7200.0 s; at most 30 s)",
        "two-hours-length-unstated.flac": "too long (at most 30 s)",
        "claims-2^36-samples.flac": "too long",
        "claims-4-GB.wav": "ok: 1.00 s",  # libsndfile reads what the file holds
        "claims-2-GHz.wav": "sample rate of 2000000000 Hz",
        "two-minutes.mp3": "too long (at most 30 s)",  # an MP3's stated length is not trusted
        "nine-channels.wav": "9 channels",
    }


# Fetches each prompt in a fresh peak-memory window: /proc/self/clear_refs "5" resets VmHWM.
_MEASURE = """
import json, re, sys, httpx
from pathlib import Path
import soundfile
from indextts_api.config import Settings
from indextts_api.prompts import PromptError, PromptFetcher

def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

data_dir, prompt_dir, max_seconds, *names = sys.argv[1:]
settings = Settings(_env_file=None, data_dir=data_dir, prompt_dir=prompt_dir, prompt_max_seconds=float(max_seconds))
fetcher = PromptFetcher(settings, httpx.Client())
fetcher.fetch("example.wav")  # libraries loaded, first allocations made
results = {}
for name in names:
    Path("/proc/self/clear_refs").write_text("5")
    before = kb("VmRSS")
    try:
        path = fetcher.fetch(name)
        outcome = "ok: %.2f s" % soundfile.info(str(path)).duration
    except PromptError as exc:
        outcome = str(exc)
    results[name] = {"outcome": outcome, "growth_mb": (kb("VmHWM") - before) / 1024}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("hostile")
    prompts = root / "prompts"
    prompts.mkdir()
    shutil.copy(ROOT / "prompts" / "example.wav", prompts / "example.wav")
    expected = make_hostile_prompts(prompts)
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(root / "data"), str(prompts), str(MAX_SECONDS), *expected],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    return {name: (expected[name], measured[name]) for name in expected}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "name",
    [
        "two-hours.flac",
        "two-hours-length-unstated.flac",
        "claims-2^36-samples.flac",
        "claims-4-GB.wav",
        "claims-2-GHz.wav",
        "two-minutes.mp3",
        "nine-channels.wav",
    ],
)
def test_hostile_prompt_is_refused_in_bounded_memory(
    hostile_results: dict[str, tuple[str, dict[str, Any]]], name: str
) -> None:
    expected, measured = hostile_results[name]
    assert expected in measured["outcome"], measured
    assert measured["growth_mb"] < MAX_PROMPT_GROWTH_MB, measured
    print(f"{name}: {measured['outcome']}; peak growth {measured['growth_mb']:.1f} MB")


# --- text: segments bounded in characters as well as tokens -----------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "x" * 10_000,
        "Hello,   world.\n\n  Indented line\tafter a tab.  " + "y" * 123 + " end",
        "你好世界。" * 20 + " mixed " + "z" * 60,
        " ".join(["tomato"] * 1500),  # 600 tokens of ordinary words, without a full stop
    ],
)
def test_segments_are_bounded_in_characters_and_lose_nothing(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text.strip()
    assert max(len(token.rstrip()) for token in tokens) <= MAX_TOKEN_CHARS
    segments = split_text(text, 600)
    assert max(len(re.sub(r"\s+", " ", segment)) for segment in segments) <= MAX_SEGMENT_CHARS
    assert re.sub(r"\s", "", "".join(segments)) == re.sub(r"\s", "", text)


def test_ordinary_words_and_sentences_are_not_cut() -> None:
    word = "pneumonoultramicroscopicsilicovolcanoconiosis"  # 45 letters
    assert tokenize(f"a {word} b") == ["a ", f"{word} ", "b"]
    prose = "The committee reviewed every proposal carefully. Then it voted, and the motion passed."
    assert split_text(prose, 120) == [prose]


def test_long_sentences_are_packed_up_to_the_character_bound() -> None:
    sentence = "The committee reviewed every proposal carefully before the final vote was taken. "
    segments = split_text(sentence * 20, 600)
    assert all(segment.endswith(".") for segment in segments)  # still cut between sentences
    assert all(len(segment) <= MAX_SEGMENT_CHARS for segment in segments)
    assert len(segments) == 7  # three 82-character sentences per segment
