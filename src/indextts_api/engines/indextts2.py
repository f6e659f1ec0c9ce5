"""IndexTTS2 (``indextts.infer_v2.IndexTTS2``): the production voice-cloning engine (optional extra).

Facts the adapter respects (DESIGN.md): the model is not thread-safe (one instance per process,
one ``infer`` at a time); its speaker cache is keyed by the prompt's path string, so prompts are
content-addressed files; ``infer`` does not normalize emotion vectors, the caller does.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import soundfile

from indextts_api.engines.base import EngineUnavailable, SynthesisJob, SynthesisOutcome

logger = logging.getLogger(__name__)

# The spec's (and the original server's) minimum checkpoint set.
REQUIRED_FILES = ("bpe.model", "gpt.pth", "config.yaml", "s2mel.pth", "wav2vec2bert_stats.pt")
MODEL_VERSION = "2.0"


def package_available() -> bool:
    try:
        return importlib.util.find_spec("indextts.infer_v2") is not None
    except ModuleNotFoundError:
        return False


def missing_checkpoints(model_dir: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]


def infer_arguments(model: Any, job: SynthesisJob, output_path: Path) -> dict[str, Any]:
    """The keyword arguments of ``IndexTTS2.infer`` for one job, exactly as the original server built them."""
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
        "output_path": str(output_path),
        "emo_audio_prompt": emotion_prompt,
        "emo_alpha": params.emo_weight,
        "emo_vector": emotion_vector,
        "use_emo_text": method == 3,
        "emo_text": params.emo_text or None,
        "use_random": params.emo_random,
        "verbose": False,
        "max_text_tokens_per_segment": int(params.max_text_tokens_per_segment),
        # Generation kwargs, passed through to the GPT's generate().
        "do_sample": params.do_sample,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else None,
        "temperature": params.temperature,
        "length_penalty": params.length_penalty,
        "num_beams": params.num_beams,
        "repetition_penalty": params.repetition_penalty,
        "max_mel_tokens": int(params.max_mel_tokens),
    }


class IndexTTS2Engine:
    name = "indextts2"
    model_version = MODEL_VERSION

    def __init__(self, model_dir: Path, *, use_fp16: bool, use_deepspeed: bool, use_cuda_kernel: bool) -> None:
        missing = missing_checkpoints(model_dir)
        if missing:
            raise EngineUnavailable(
                f"IndexTTS2 checkpoints missing in {model_dir}: {', '.join(missing)}. "
                "Download them first (README: 'IndexTTS2 checkpoints')."
            )
        if not package_available():
            raise EngineUnavailable("IndexTTS2 is not installed: pip install -e '.[indextts]'")
        from indextts.infer_v2 import IndexTTS2

        try:
            self._model = IndexTTS2(
                cfg_path=str(model_dir / "config.yaml"),
                model_dir=str(model_dir),
                use_fp16=use_fp16,
                use_deepspeed=use_deepspeed,
                use_cuda_kernel=use_cuda_kernel,
            )
        except OSError as exc:
            # Its auxiliary models (w2v-bert-2.0, MaskGCT codec, campplus, BigVGAN) come from the
            # model hub unless cached; offline that is where construction fails.
            raise EngineUnavailable(
                f"IndexTTS2 could not load its models ({exc}). Offline hosts need the auxiliary models "
                "pre-fetched into the hub cache (README: 'IndexTTS2 checkpoints')."
            ) from exc

    def synthesize(self, job: SynthesisJob, output_path: Path) -> SynthesisOutcome:
        self._model.infer(**infer_arguments(self._model, job, output_path))
        info = soundfile.info(str(output_path))
        return SynthesisOutcome(audio_seconds=float(info.duration), sample_rate=int(info.samplerate))

    def close(self) -> None:
        self._model = None
