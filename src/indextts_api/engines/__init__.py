"""Engine selection: ``auto`` picks IndexTTS2 when its package and checkpoints are present, else Piper."""

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
    "SynthesisError",
    "SynthesisJob",
    "SynthesisOutcome",
    "describe_engine",
    "load_engine",
    "resolve_engine_name",
]


def resolve_engine_name(settings: Settings) -> str:
    """The engine a worker with these settings runs, without loading it."""
    if settings.engine != "auto":
        return settings.engine
    if indextts2.package_available() and not indextts2.missing_checkpoints(settings.model_dir):
        return "indextts2"
    return "piper"


def describe_engine(settings: Settings, reported: dict[str, Any] | None = None) -> EngineInfo:
    """The engine in use: as a worker ``reported`` it (heartbeat), else as these settings select it."""
    name = str(reported["engine"]) if reported and reported.get("engine") else resolve_engine_name(settings)
    if name == "indextts2":
        return EngineInfo(name=name, model_version=indextts2.MODEL_VERSION)
    return EngineInfo(name=name, model_version=piper.PiperEngine.model_version, ignores=piper.CAPABILITY_GAPS)


def load_engine(settings: Settings) -> Engine:
    name = resolve_engine_name(settings)
    if settings.engine == "auto":
        reason = (
            "checkpoints and package present"
            if name == "indextts2"
            else (f"no IndexTTS2 checkpoints in {settings.model_dir} or package not installed")
        )
        logger.info("engine auto-selected: %s (%s)", name, reason)
    if name == "indextts2":
        return indextts2.IndexTTS2Engine(
            settings.model_dir,
            use_fp16=settings.fp16,
            use_deepspeed=settings.deepspeed,
            use_cuda_kernel=settings.cuda_kernel,
        )
    return piper.PiperEngine(threads=settings.piper_threads_per_engine)
