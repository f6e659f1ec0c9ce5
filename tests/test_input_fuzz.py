"""Property-based: whatever the bytes, POST /generate answers 200 or a 4xx JSON error, never a 5xx.

Generated bodies (random JSON, near-valid tasks with one part replaced, raw bytes), URLs and prompt
paths go to the API role alone (``public_api``: public URLs only, the suite's prompt directory, topics
no worker reads), so a generated task that is valid is only queued, never synthesized. The URL and
path checks are also held, without a server, to what the HTTP client and the file system accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indextts_api.schemas import TaskCreate, TaskParams, check_audio_reference, check_http_url
from tests.conftest import API_PASSWORD, API_USER

# Reproducible, like the schemathesis run; no example database written into the checkout.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)

VALID: dict[str, Any] = {
    "spk_audio_prompt": "https://voices.example.com/a.wav",
    "text": "Hello there.",
    "hook_url": "https://hooks.example.com/h",
}

# What breaks parsers: controls, separators, surrogates, look-alikes, and pieces of URL and path syntax.
NASTY_CHARS = "\x00\t\n\r\x1b\x7f\x85\xa0\u2028\u3000\ufeff\u200d\ud800\udfff .:/\\%@#?[]☃ä"
NASTY_PIECES = ["..", "%00", "%2e%2e", "xn--", "://", "😀"]

chars = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(NASTY_CHARS))
nasty_text = st.one_of(
    st.lists(st.text(chars, max_size=6) | st.sampled_from(NASTY_PIECES), max_size=6).map("".join),
    st.text(chars, min_size=250, max_size=300),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(),  # NaN and infinities included: Python's json writes and reads them
    nasty_text,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4), max_leaves=12
)

label = st.text(st.sampled_from(string.ascii_lowercase + string.digits + "-_") | chars, max_size=70)
host = st.one_of(
    st.lists(label, min_size=1, max_size=6).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
    st.sampled_from(["voices.example.com", "bücher.example", "localhost", "0x7f.1", "2130706433", "[::1]", ""]),
)
port = st.none() | st.integers(min_value=-5, max_value=70_000).map(str) | nasty_text
urls = st.builds(
    lambda scheme, userinfo, host, port, path: f"{scheme}{userinfo}{host}{'' if port is None else ':' + port}{path}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "file://", "javascript:", "http:/", "//", ""]),
    st.sampled_from(["", "", "", "user:pw@", "@", "a@b@"]),
    host,
    port,
    st.just("/a.wav") | nasty_text.map(lambda text: "/" + text),
)
paths = st.one_of(
    st.lists(
        nasty_text | st.sampled_from(["example.wav", "tone.wav", "escape.wav", "voices"]), min_size=1, max_size=6
    ).map("/".join),
    # Long paths of short components (one drawn name repeated: cheap to generate).
    st.builds(
        lambda name, count: "/".join([name] * count),
        st.text(string.ascii_letters, min_size=1, max_size=8),
        st.integers(100, 600),
    ),
)
REFERENCE_FIELDS = ["hook_url", "spk_audio_prompt", "params.emo_audio_prompt"]


def with_field(field: str, value: object) -> dict[str, Any]:
    """A valid task with ``value`` in ``field`` (``params.`` names a parameter)."""
    if field.startswith("params."):
        return {**VALID, "params": {"emo_control_method": 1, field.removeprefix("params."): value}}
    return {**VALID, field: value}


near_valid_bodies = st.one_of(
    st.builds(with_field, st.sampled_from([*TaskCreate.model_fields, "unknown"]), json_values),
    st.builds(with_field, st.sampled_from([f"params.{name}" for name in TaskParams.model_fields]), json_values),
    st.builds(with_field, st.sampled_from(REFERENCE_FIELDS), urls),
    st.builds(with_field, st.sampled_from(REFERENCE_FIELDS[1:]), paths),
    st.dictionaries(nasty_text, json_values, max_size=3).map(lambda extra: {**VALID, **extra}),
)


def encode(body: object, ascii_only: bool) -> bytes:
    """JSON bytes: with \\u escapes, or as UTF-8 with any lone surrogate as its raw (invalid) bytes."""
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_bodies = st.builds(encode, json_values | near_valid_bodies, st.booleans())
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=50).map(lambda junk: b'{"text": "' + junk + b'", "spk_audio_prompt": "tone.wav"}'),
    st.sampled_from(
        [
            b'{"text": 1' + b"0" * 5000 + b"}",  # past Python's int-from-string digit limit
            b"[" * 5000 + b"]" * 5000,  # past the JSON decoder's recursion limit
            b'{"text": "\xff\xfe"}',
            "\ufeff".encode() + json.dumps(VALID).encode(),
            json.dumps(VALID).encode("utf-16"),
            b'{"text": NaN, "hook_url": Infinity}',
            b'{"spk_audio_prompt": "tone.wav", "spk_audio_prompt": 1}',
        ]
    ),
)


@pytest.fixture(scope="module")
def client(public_api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=public_api, auth=(API_USER, API_PASSWORD), timeout=30) as api:
        yield api


def post(client: httpx.Client, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post("/generate", content=content, headers={"Content-Type": content_type})


def assert_answered(response: httpx.Response) -> None:
    """200 with a task id, or a 4xx with a JSON ``{"error": ...}``; never a 5xx."""
    assert response.status_code < 500, f"{response.status_code} for {response.request.content[:300]!r}"
    body = response.json()
    if response.status_code == 200:
        assert set(body) == {"task_uuid", "status", "message"}
    else:
        assert 400 <= response.status_code < 500
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body


@FUZZ
@given(content=json_bodies)
def test_generated_json_bodies_are_answered(client: httpx.Client, content: bytes) -> None:
    assert_answered(post(client, content))


@FUZZ
@given(content=raw_bodies, content_type=st.sampled_from(["application/json", "text/plain", "application/x+json"]))
def test_raw_bytes_are_answered(client: httpx.Client, content: bytes, content_type: str) -> None:
    assert_answered(post(client, content, content_type))


@FUZZ
@given(field=st.sampled_from(REFERENCE_FIELDS), url=urls)
def test_generated_urls_are_answered(client: httpx.Client, field: str, url: str) -> None:
    assert_answered(post(client, encode(with_field(field, url), ascii_only=True)))


@FUZZ
@given(field=st.sampled_from(REFERENCE_FIELDS[1:]), path=paths)
def test_generated_prompt_paths_are_answered(client: httpx.Client, field: str, path: str) -> None:
    assert_answered(post(client, encode(with_field(field, path), ascii_only=True)))


@settings(FUZZ, max_examples=400)
@given(url=urls)
def test_an_accepted_url_is_one_the_http_client_can_use(url: str) -> None:
    try:
        accepted = check_http_url(url, "url")
    except ValueError:
        return
    parsed = httpx.URL(accepted)  # raises if the client could not build it
    assert parsed.scheme in ("http", "https")
    host = parsed.raw_host  # as sent: IDNA-encoded, an IPv6 address without brackets
    if b":" not in host:
        labels = host.removesuffix(b".").split(b".")
        assert len(host) <= 254 and all(0 < len(label) <= 63 for label in labels), host


@pytest.fixture(scope="module")
def lookup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lookup")
    (directory / "example.wav").write_bytes(b"RIFF")
    return directory


@settings(FUZZ, max_examples=400)
@given(path=paths)
def test_an_accepted_prompt_path_can_be_looked_up(lookup_dir: Path, path: str) -> None:
    """The file system can only say "not there" about an accepted path: it never raises otherwise
    (a name over NAME_MAX, a path over PATH_MAX, one it cannot encode)."""
    try:
        accepted = check_audio_reference(path, "spk_audio_prompt")
    except ValueError:
        return
    if "://" in accepted:
        return
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.stat(lookup_dir / accepted)
