"""IndexTTS2 (``indextts.infer_v2.IndexTTS2``): the production voice-cloning engine (optional extra).

Facts the adapter respects (DESIGN.md, "IndexTTS2, the real class"): the model is not thread-safe
(one instance per process, one ``infer`` at a time); its speaker cache is keyed by the prompt's
path string, so prompts are content-addressed files; ``infer`` does not normalize emotion vectors,
the caller does; its own save path needs torchcodec, so the audio is taken from
``infer(output_path=None)`` and written here with soundfile; ``do_sample`` is ignored (it always
samples). Importing the package imports torch and torchaudio: only the TTS worker does it, never
the API process (``package_available`` looks at files only).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from indextts_api.engines.base import (
    EngineUnavailable,
    OnSegment,
    SynthesisError,
    SynthesisJob,
    SynthesisOutcome,
)

logger = logging.getLogger(__name__)

PACKAGE = "indextts2-inference"
MODEL_VERSION = "2.0"
# Everything the real constructor loads from the checkpoint directory (both the PyPI package and
# upstream main): the spec's five files, the emotion matrices and the Qwen emotion model.
REQUIRED_FILES = (
    "config.yaml",
    "gpt.pth",
    "s2mel.pth",
    "bpe.model",
    "wav2vec2bert_stats.pt",
    "feat1.pt",
    "feat2.pt",
)
REQUIRED_DIRS = ("qwen0.6bemo4-merge",)
# Stated in /health and in the log line of a task that asked for it.
CAPABILITY_GAPS = ["do_sample=false (IndexTTS2 always samples: the package ignores do_sample)"]
# The warm-up synthesis: short, so that start-up pays the first call's one-time costs (JIT
# compilation, allocator growth, kernel selection) and little else.
WARMUP_TEXT = "Hello."
WARMUP_MAX_MEL_TOKENS = 16
WARMUP_PROMPT_SECONDS = 1.5


def package_available() -> bool:
    """Whether ``indextts.infer_v2`` is installed, without importing anything (its import loads torch)."""
    spec = importlib.util.find_spec("indextts")  # a top-level name: nothing is imported to find it
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(location) / "infer_v2.py").is_file() for location in spec.submodule_search_locations)


def package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_checkpoints(model_dir: Path) -> list[str]:
    """The required checkpoint files and directories that ``model_dir`` lacks, by name."""
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    return missing + [f"{name}/" for name in REQUIRED_DIRS if not (model_dir / name).is_dir()]


def unavailable_reason(model_dir: Path) -> str | None:
    """Why IndexTTS2 cannot be loaded here, as far as files tell; None when it may be."""
    if not package_available():
        return "IndexTTS2 is not installed (pip install -e '.[indextts]', README 'IndexTTS2')"
    missing = missing_checkpoints(model_dir)
    if missing:
        return f"IndexTTS2 checkpoints missing in {model_dir}: {', '.join(missing)}"
    return None


def infer_arguments(model: Any, job: SynthesisJob) -> dict[str, Any]:
    """The keyword arguments of ``IndexTTS2.infer`` for one job (its audio is returned, not saved)."""
    params = job.params
    method = params.emo_control_method
    emotion_prompt: str | None = None
    if method == 1:
        # No separate emotion audio: the speaker's own audio carries the emotion.
        emotion_prompt = str(job.emotion_prompt or job.speaker_prompt)
    emotion_vector = model.normalize_emo_vec(params.emotion_vector, apply_bias=True) if method == 2 else None
    return {
        "spk_audio_prompt": str(job.speaker_prompt),
        "text": job.text,
        "output_path": None,
        "emo_audio_prompt": emotion_prompt,
        "emo_alpha": params.emo_weight,
        "emo_vector": emotion_vector,
        "use_emo_text": method == 3,
        "emo_text": params.emo_text or None,
        "use_random": params.emo_random,
        "verbose": False,
        "max_text_tokens_per_segment": int(params.max_text_tokens_per_segment),
        "stream_return": False,
        # Generation kwargs, passed through to the GPT's generate(); do_sample is not one of them
        # (the package pops it and always samples).
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else None,
        "temperature": params.temperature,
        "length_penalty": params.length_penalty,
        "num_beams": params.num_beams,
        "repetition_penalty": params.repetition_penalty,
        "max_mel_tokens": int(params.max_mel_tokens),
    }


@dataclass(frozen=True)
class EngineOptions:
    """How to build the model: the worker's settings that concern IndexTTS2."""

    model_dir: Path
    cache_dir: Path  # the text normaliser's compiled grammars (built once, then loaded)
    device: str = "auto"
    worker_index: int = 0
    language: str = "auto"
    use_fp16: bool = False
    use_deepspeed: bool = False
    use_cuda_kernel: bool = False
    warmup: bool = True


def resolve_device(setting: str, worker_index: int) -> str | None:
    """The device for ``infer``: as set, or on a host with several GPUs one per worker, round robin;
    None leaves the choice to the package (cuda:0, mps or cpu)."""
    if setting != "auto":
        return setting
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{worker_index % count}" if count > 1 else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this host (workers starting together)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def redirect_normalizer_cache(cache_dir: Path) -> None:
    """Compile the text normaliser's grammars into ``cache_dir``, under a lock, instead of into the
    installed package (a read-only install would fail; two workers would race the 60 s build).

    The package (2.1.1) hard-codes the directory in ``TextNormalizer._get_nemo_normalizer``; this
    replaces that one method with the same call and another directory.
    """
    try:
        from indextts.utils import front
    except ModuleNotFoundError:
        logger.warning("indextts.utils.front not found: the text normaliser's cache stays where the package puts it")
        return
    cache_dir.mkdir(parents=True, exist_ok=True)

    def get_nemo_normalizer(_self: Any, lang: str) -> Any:
        from nemo_text_processing.text_normalization.normalize import Normalizer

        started = time.monotonic()
        with _file_lock(cache_dir / ".build.lock"):
            normalizer = Normalizer(input_case="cased", lang=lang, cache_dir=str(cache_dir))
        logger.info("text normaliser (%s) ready in %.1f s; grammars in %s", lang, time.monotonic() - started, cache_dir)
        return normalizer

    front.TextNormalizer._get_nemo_normalizer = get_nemo_normalizer


def _import_model_class() -> Any:
    from indextts_api.engines.torchaudio_compat import import_torchaudio

    import_torchaudio()  # before the package: its modules import torchaudio
    from indextts.infer_v2 import IndexTTS2

    return IndexTTS2


# What infer_generator writes (it sets sampling_rate = 22050 itself, whatever the config says).
STREAM_SAMPLE_RATE = 22_050


class IndexTTS2Engine:
    name = "indextts2"
    model_version = MODEL_VERSION

    def __init__(self, options: EngineOptions) -> None:
        reason = unavailable_reason(options.model_dir)
        if reason:
            raise EngineUnavailable(reason)
        version = package_version() or "unknown version"
        started = time.monotonic()
        try:
            model_class = _import_model_class()
            redirect_normalizer_cache(options.cache_dir)
            self.device = resolve_device(options.device, options.worker_index)
        except Exception as exc:
            raise EngineUnavailable(
                f"IndexTTS2 ({PACKAGE} {version}) could not be imported: {type(exc).__name__}: {exc}"
            ) from exc
        imported = time.monotonic()
        try:
            self._model = model_class(
                model_dir=str(options.model_dir),
                cfg_path=str(options.model_dir / "config.yaml"),
                use_fp16=options.use_fp16,
                device=self.device,
                use_cuda_kernel=options.use_cuda_kernel,
                use_deepspeed=options.use_deepspeed,
                language=None if options.language == "auto" else options.language,
            )
        except Exception as exc:
            hint = ""
            if isinstance(exc, OSError):
                # Its auxiliary models (w2v-bert-2.0, MaskGCT codec, campplus, BigVGAN) come from
                # the model hub unless cached; offline, that is where construction fails.
                hint = (
                    " Offline hosts need the auxiliary models pre-fetched into the hub cache "
                    "(README, 'IndexTTS2': hf download ...)."
                )
            raise EngineUnavailable(
                f"IndexTTS2 ({PACKAGE} {version}) could not load the checkpoints in {options.model_dir}: "
                f"{type(exc).__name__}: {exc}.{hint}"
            ) from exc
        self.device = str(getattr(self._model, "device", self.device))
        constructed = time.monotonic()
        logger.info(
            "IndexTTS2 %s on %s: imported in %.1f s, constructed in %.1f s",
            version,
            self.device,
            imported - started,
            constructed - imported,
        )
        if options.warmup:
            self._warm_up()

    def _warm_up(self) -> None:
        """One short synthesis before the first task, which would otherwise pay its one-time costs."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="indextts2-warmup-") as scratch:
            prompt = Path(scratch) / "prompt.wav"
            soundfile.write(prompt, _warmup_prompt(), 22050, subtype="PCM_16")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # reaching max_mel_tokens is the point here
                    self._model.infer(
                        spk_audio_prompt=str(prompt),
                        text=WARMUP_TEXT,
                        output_path=None,
                        verbose=False,
                        max_mel_tokens=WARMUP_MAX_MEL_TOKENS,
                    )
            except Exception as exc:
                raise EngineUnavailable(
                    f"IndexTTS2 loaded but its warm-up synthesis failed: {type(exc).__name__}: {exc}"
                ) from exc
        logger.info("IndexTTS2 warm-up synthesis in %.1f s", time.monotonic() - started)

    def synthesize(self, job: SynthesisJob, output_path: Path, on_segment: OnSegment | None = None) -> SynthesisOutcome:
        if on_segment is not None:
            return self._synthesize_streaming(job, output_path, on_segment)
        result = self._model.infer(**infer_arguments(self._model, job))
        if result is None:
            raise SynthesisError("the text has nothing to speak once normalised")
        sample_rate, samples = result
        samples = np.asarray(samples)
        soundfile.write(output_path, samples, int(sample_rate), subtype="PCM_16", format="WAV")
        ignored = CAPABILITY_GAPS if not job.params.do_sample else []
        return SynthesisOutcome(
            audio_seconds=float(samples.shape[0]) / float(sample_rate), sample_rate=int(sample_rate), ignored=ignored
        )

    def _synthesize_streaming(self, job: SynthesisJob, output_path: Path, on_segment: OnSegment) -> SynthesisOutcome:
        """``infer(stream_return=True)``: the package yields each text segment's audio (a float
        tensor [1, samples]) and the silence between segments as it goes."""
        sample_rate = STREAM_SAMPLE_RATE
        frames = 0
        with soundfile.SoundFile(
            output_path, "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="WAV"
        ) as wav:
            for piece in self._model.infer(**{**infer_arguments(self._model, job), "stream_return": True}):
                if piece is None:
                    continue
                floats = piece.float().numpy() if hasattr(piece, "float") else np.asarray(piece)
                audio = np.clip(floats.reshape(-1) * 32767, -32767, 32767).astype(np.int16)
                if not audio.size:
                    continue
                wav.write(audio)
                frames += audio.size
                on_segment(audio, sample_rate)
        if frames == 0:
            raise SynthesisError("the text has nothing to speak once normalised")
        ignored = CAPABILITY_GAPS if not job.params.do_sample else []
        return SynthesisOutcome(audio_seconds=frames / sample_rate, sample_rate=sample_rate, ignored=ignored)

    def close(self) -> None:
        self._model = None


def _warmup_prompt() -> np.ndarray:
    """A voice-like test signal: a pitched tone with syllable-rate loudness changes and some noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(WARMUP_PROMPT_SECONDS * 22050)) / 22050
    tone = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
