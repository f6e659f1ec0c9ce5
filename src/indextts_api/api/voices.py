"""The voice endpoints: POST /voices (an upload or a URL), GET /voices, GET and DELETE /voices/{voice_id}.

They are plain ``def`` routes, which FastAPI runs in its thread pool: decoding a recording and
the S3 requests block, and must not hold the event loop that answers POST /generate.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Response, UploadFile, status

from indextts_api.api.deps import AuthorizedDep
from indextts_api.metrics import VOICES_REGISTERED
from indextts_api.netguard import known_internal_reason
from indextts_api.prompts import PromptError, download
from indextts_api.schemas import ErrorPublic, check_http_url, check_voice_id
from indextts_api.voices import (
    VoiceList,
    VoicePublic,
    VoiceRejected,
    check_name,
    parse_metadata,
    prepare_voice,
)

logger = logging.getLogger(__name__)

# The form's fields besides the recording (name, metadata, boundaries) fit in this.
VOICE_FORM_OVERHEAD_BYTES = 64 * 1024
_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorPublic, "description": "Not a usable recording, or a bad form field"},
    401: {"model": ErrorPublic, "description": "Missing or wrong credentials"},
    404: {"model": ErrorPublic, "description": "No such voice"},
    413: {"model": ErrorPublic, "description": "Recording larger than PROMPT_MAX_BYTES"},
    503: {"model": ErrorPublic, "description": "Voice storage (S3) unavailable"},
}


def _storage_unavailable(exc: Exception) -> HTTPException:
    logger.error("voice storage unavailable: %s", exc)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "voice storage unavailable; retry later")


def _known_voice_id(voice_id: str) -> str:
    try:
        return check_voice_id(voice_id, "voice_id")
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such voice") from None


def register_voice(
    services: AuthorizedDep,
    response: Response,
    name: Annotated[str, Form(description="what the voice is called (1-100 characters)", examples=["Narrator"])],
    file: Annotated[UploadFile | None, File(description="the recording: WAV, FLAC, MP3 or OGG, 1-30 s")] = None,
    url: Annotated[
        str | None, Form(description="or an http(s) URL to download it from", examples=["https://example.com/v.wav"])
    ] = None,
    metadata: Annotated[
        str | None, Form(description="free-form JSON object kept with the voice", examples=['{"speaker": "Ann"}'])
    ] = None,
) -> VoicePublic:
    """Register a voice from an uploaded recording or a URL: decoded, checked (length, silence,
    clipping), normalised (mono, 16-bit, at most 22,050 Hz) and stored. The id is the audio's
    hash: the same audio gives the same id (200 with the record it already has), new audio 201.
    Use it as ``"spk_audio_prompt": "voice:<voice_id>"`` (or ``params.emo_audio_prompt``)."""
    settings = services.settings
    try:
        clean_name = check_name(name)
        extra = parse_metadata(metadata)
    except VoiceRejected as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    if (file is None) == (not url):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "give the recording as either file or url (one of them)")
    with tempfile.TemporaryDirectory(prefix="voice-") as scratch:
        source = Path(scratch) / "source"
        if file is not None:
            with source.open("wb") as sink:
                shutil.copyfileobj(file.file, sink)
            origin = "upload"
        else:
            assert url is not None
            origin = _download(services, url, source)
        normalised = Path(scratch) / "voice.wav"
        try:
            prepared = prepare_voice(source, normalised, settings)
        except VoiceRejected as exc:
            VOICES_REGISTERED.labels("rejected").inc()
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        try:
            record, created = services.voices.register(prepared, normalised, clean_name, extra, origin)
            public = services.voices.public(record)
        except Exception as exc:  # noqa: BLE001 - whatever S3 raised, the client gets a 503
            raise _storage_unavailable(exc) from None
    VOICES_REGISTERED.labels("created" if created else "existing").inc()
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return public


def _download(services: AuthorizedDep, url: str, target: Path) -> str:
    """The recording at ``url`` into ``target``, as a prompt is downloaded; returns the URL."""
    settings = services.settings
    try:
        check_http_url(url, "url")
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    if not settings.private_urls_allowed:
        reason = known_internal_reason(url)
        if reason:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"url: {reason}; only public URLs are allowed")
    try:
        with target.open("wb") as sink:
            download(services.prompt_http, settings, url, "url", sink)
    except PromptError as exc:
        VOICES_REGISTERED.labels("rejected").inc()
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    return url


def list_voices(
    services: AuthorizedDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="next_after of the previous page")] = None,
) -> VoiceList:
    """Registered voices in id order, ``limit`` at a time."""
    if after is not None:
        _known_voice_id(after)
    try:
        return services.voices.list(limit, after)
    except Exception as exc:  # noqa: BLE001
        raise _storage_unavailable(exc) from None


def get_voice(voice_id: str, services: AuthorizedDep) -> VoicePublic:
    """A voice's record, with a presigned URL of its stored audio."""
    try:
        record = services.voices.get(_known_voice_id(voice_id))
        public = None if record is None else services.voices.public(record)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _storage_unavailable(exc) from None
    if public is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such voice")
    return public


def delete_voice(voice_id: str, services: AuthorizedDep) -> Response:
    """Delete a voice: gone from the list, refused in new tasks, and tasks still waiting for it
    fail with a message saying so."""
    voice_id = _known_voice_id(voice_id)
    try:
        deleted = services.voices.delete(voice_id)
    except Exception as exc:  # noqa: BLE001
        raise _storage_unavailable(exc) from None
    services.voice_check.forget(voice_id)
    if not deleted:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such voice")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def add_voice_routes(app: FastAPI) -> None:
    app.post(
        "/voices",
        response_model=VoicePublic,
        status_code=status.HTTP_201_CREATED,
        responses={200: {"model": VoicePublic, "description": "This audio was registered already"}, **_ERRORS},
        tags=["voices"],
    )(register_voice)
    app.get("/voices", response_model=VoiceList, responses=_ERRORS, tags=["voices"])(list_voices)
    app.get("/voices/{voice_id}", response_model=VoicePublic, responses=_ERRORS, tags=["voices"])(get_voice)
    app.delete("/voices/{voice_id}", status_code=204, responses=_ERRORS, tags=["voices"])(delete_voice)
