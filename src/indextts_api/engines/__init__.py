"""Engine selection: ``auto`` picks IndexTTS2 when its package and checkpoints are present, and
falls back to Piper, saying why, when they are not or when IndexTTS2 fails to load."""

from __future__ import annotations

import logging
from typing import Any

from indextts_api.config import Settings
from indextts_api.engines import indextts2, piper
from indextts_api.engines.base import Engine, EngineUnavailable, SynthesisError, SynthesisJob, SynthesisOutcome
from indextts_api.schemas import EngineInfo

logger = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineUnavailable",
    "LoadedEngine",
    "SynthesisError",
    "SynthesisJob",
    "SynthesisOutcome",
    "auto_fallback_reason",
    "describe_engine",
    "load_engine",
    "resolve_engine_name",
]


def auto_fallback_reason(settings: Settings) -> str | None:
    """Why ``auto`` would not choose IndexTTS2 here, judged from files only (nothing is imported)."""
    return indextts2.unavailable_reason(settings.model_dir)


def resolve_engine_name(settings: Settings) -> str:
    """The engine a worker with these settings runs, without loading it."""
    if settings.engine != "auto":
        return settings.engine
    return "piper" if auto_fallback_reason(settings) else "indextts2"


def describe_engine(settings: Settings, reported: dict[str, Any] | None = None) -> EngineInfo:
    """The engine in use: as a worker ``reported`` it (heartbeat), else as these settings select it."""
    if reported and reported.get("engine"):
        name = str(reported["engine"])
        reason = reported.get("fallback_reason")
    else:
        name = resolve_engine_name(settings)
        reason = auto_fallback_reason(settings) if settings.engine == "auto" and name == "piper" else None
    if name == "indextts2":
        return EngineInfo(name=name, model_version=indextts2.MODEL_VERSION, ignores=indextts2.CAPABILITY_GAPS)
    return EngineInfo(
        name=name,
        model_version=piper.PiperEngine.model_version,
        ignores=piper.CAPABILITY_GAPS,
        fallback_reason=str(reason) if reason else None,
    )


class LoadedEngine:
    """An engine and what its heartbeat tells the API about it."""

    def __init__(self, engine: Engine, details: dict[str, Any]) -> None:
        self.engine = engine
        self.details = {"engine": engine.name, "model_version": engine.model_version, **details}


def _indextts2(settings: Settings) -> LoadedEngine:
    engine = indextts2.IndexTTS2Engine(
        indextts2.EngineOptions(
            model_dir=settings.model_dir,
            cache_dir=settings.engine_cache_location,
            device=settings.device,
            worker_index=settings.worker_index,
            language=settings.engine_language,
            use_fp16=settings.fp16,
            use_deepspeed=settings.deepspeed,
            use_cuda_kernel=settings.cuda_kernel,
            warmup=settings.engine_warmup,
        )
    )
    return LoadedEngine(engine, {"device": engine.device, "package_version": indextts2.package_version()})


def _piper(settings: Settings, fallback_reason: str | None = None) -> LoadedEngine:
    engine = piper.PiperEngine(threads=settings.piper_threads_per_engine)
    return LoadedEngine(engine, {"fallback_reason": fallback_reason} if fallback_reason else {})


def load_engine(settings: Settings) -> LoadedEngine:
    """The engine for this worker. ``indextts2`` set explicitly fails with ``EngineUnavailable`` when
    it cannot load; ``auto`` then runs Piper and reports why (log, heartbeat, /health)."""
    if settings.engine == "piper":
        return _piper(settings)
    if settings.engine == "indextts2":
        return _indextts2(settings)
    reason = auto_fallback_reason(settings)
    if reason is None:
        try:
            loaded = _indextts2(settings)
        except EngineUnavailable as exc:
            reason = str(exc)
            logger.error("engine auto: IndexTTS2 did not load, running Piper instead: %s", reason)
        else:
            logger.info("engine auto-selected: indextts2 (checkpoints in %s)", settings.model_dir)
            return loaded
    else:
        logger.info("engine auto-selected: piper (%s)", reason)
    return _piper(settings, fallback_reason=reason)
