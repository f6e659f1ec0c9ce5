"""A randomly initialised IndexTTS2 checkpoint set, in the real architecture, that the real class loads.

The trained weights cannot be downloaded on these machines, but everything ``IndexTTS2.__init__``
loads can be built from the package's own model classes with random values: ``config.yaml``,
``gpt.pth``, ``s2mel.pth``, ``bpe.model``, ``wav2vec2bert_stats.pt``, ``feat1.pt``, ``feat2.pt``,
``qwen0.6bemo4-merge/``, and in a Hugging Face hub cache the auxiliary models (w2v-bert-2.0, the
MaskGCT semantic codec, CAMPPlus, BigVGAN) under their real repository ids, so the real loading
code runs with ``HF_HUB_OFFLINE=1`` exactly as on a host where an operator pre-fetched them.

Two sizes: ``tiny`` (the tests: every dimension the code allows is small, ~0.7 GB, seconds to
build and to run on a CPU) and ``full`` (the real ``config.yaml`` dimensions, for speed figures on
a GPU: speed depends on the architecture, not on the values). Some shapes are hard-coded in the
package and stay full-size even when tiny: w2v-bert's hidden size 1024 and at least 17 layers
(``hidden_states[17]`` is read), the GPT's ``model_dim`` 1280 (s2mel's ``Linear(1280, 256)``),
CAMPPlus(80, 192), 80 mel bands, hop 256.

So that every run does the same work, the GPT's stop and start mel tokens are biased down: it
generates exactly ``max_mel_tokens`` codes. The emotion Qwen emits its end-of-sequence token first
(the package then falls back to a calm emotion vector), so ``emo_control_method=3`` finishes.

Needs the ``indextts`` extra (torch, transformers, the package itself). Run as a script:
``python -m indextts_api.engines.indextts2_random MODEL_DIR HUB_CACHE [--size tiny|full]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "full"]

# The published IndexTTS-2 config.yaml: the full-size architecture.
FULL_CONFIG: dict[str, Any] = {
    "dataset": {
        "bpe_model": "bpe.model",
        "sample_rate": 24000,
        "squeeze": False,
        "mel": {
            "sample_rate": 24000,
            "n_fft": 1024,
            "hop_length": 256,
            "win_length": 1024,
            "n_mels": 100,
            "mel_fmin": 0,
            "normalize": False,
        },
    },
    "gpt": {
        "model_dim": 1280,
        "max_mel_tokens": 1815,
        "max_text_tokens": 600,
        "heads": 20,
        "use_mel_codes_as_input": True,
        "mel_length_compression": 1024,
        "layers": 24,
        "number_text_tokens": 12000,
        "number_mel_codes": 8194,
        "start_mel_token": 8192,
        "stop_mel_token": 8193,
        "start_text_token": 0,
        "stop_text_token": 1,
        "train_solo_embeddings": False,
        "condition_type": "conformer_perceiver",
        "condition_module": {
            "output_size": 512,
            "linear_units": 2048,
            "attention_heads": 8,
            "num_blocks": 6,
            "input_layer": "conv2d2",
            "perceiver_mult": 2,
        },
        "emo_condition_module": {
            "output_size": 512,
            "linear_units": 1024,
            "attention_heads": 4,
            "num_blocks": 4,
            "input_layer": "conv2d2",
            "perceiver_mult": 2,
        },
    },
    "semantic_codec": {
        "codebook_size": 8192,
        "hidden_size": 1024,
        "codebook_dim": 8,
        "vocos_dim": 384,
        "vocos_intermediate_dim": 2048,
        "vocos_num_layers": 12,
    },
    "s2mel": {
        "preprocess_params": {
            "sr": 22050,
            "spect_params": {
                "n_fft": 1024,
                "win_length": 1024,
                "hop_length": 256,
                "n_mels": 80,
                "fmin": 0,
                "fmax": "None",
            },
        },
        "dit_type": "DiT",
        "reg_loss_type": "l1",
        "style_encoder": {"dim": 192},
        "length_regulator": {
            "channels": 512,
            "is_discrete": False,
            "in_channels": 1024,
            "content_codebook_size": 2048,
            "sampling_ratios": [1, 1, 1, 1],
            "vector_quantize": False,
            "n_codebooks": 1,
            "quantizer_dropout": 0.0,
            "f0_condition": False,
            "n_f0_bins": 512,
        },
        "DiT": {
            "hidden_dim": 512,
            "num_heads": 8,
            "depth": 13,
            "class_dropout_prob": 0.1,
            "block_size": 8192,
            "in_channels": 80,
            "style_condition": True,
            "final_layer_type": "wavenet",
            "target": "mel",
            "content_dim": 512,
            "content_codebook_size": 1024,
            "content_type": "discrete",
            "f0_condition": False,
            "n_f0_bins": 512,
            "content_codebooks": 1,
            "is_causal": False,
            "long_skip_connection": True,
            "zero_prompt_speech_token": False,
            "time_as_token": False,
            "style_as_token": False,
            "uvit_skip_connection": True,
            "add_resblock_in_transformer": False,
        },
        "wavenet": {
            "hidden_dim": 512,
            "num_layers": 8,
            "kernel_size": 5,
            "dilation_rate": 1,
            "p_dropout": 0.2,
            "style_condition": True,
        },
    },
    "gpt_checkpoint": "gpt.pth",
    "w2v_stat": "wav2vec2bert_stats.pt",
    "s2mel_checkpoint": "s2mel.pth",
    "emo_matrix": "feat2.pt",
    "spk_matrix": "feat1.pt",
    "emo_num": [3, 17, 2, 8, 4, 5, 10, 24],
    "qwen_emo_path": "qwen0.6bemo4-merge/",
    "vocoder": {"type": "bigvgan", "name": "nvidia/bigvgan_v2_22khz_80band_256x"},
    "version": 2.0,
}

# What the tiny set changes: every dimension the package does not hard-code.
TINY_OVERRIDES: dict[str, Any] = {
    "gpt": {
        "layers": 1,
        "heads": 4,
        "number_text_tokens": 512,
        "condition_module": {"output_size": 64, "linear_units": 64, "attention_heads": 2, "num_blocks": 1},
        "emo_condition_module": {"output_size": 64, "linear_units": 64, "attention_heads": 2, "num_blocks": 1},
    },
    "semantic_codec": {"vocos_dim": 32, "vocos_intermediate_dim": 64, "vocos_num_layers": 1},
    "s2mel": {
        "length_regulator": {"channels": 64},
        "DiT": {"hidden_dim": 64, "num_heads": 2, "depth": 2, "content_dim": 64},
        "wavenet": {"hidden_dim": 64, "num_layers": 1},
    },
}

# The hub repositories the package loads its auxiliary models from.
W2V_BERT_REPO = "facebook/w2v-bert-2.0"
SEMANTIC_CODEC_REPO = "amphion/MaskGCT"
CAMPPLUS_REPO = "funasr/campplus"

# BigVGAN v2 22 kHz, 80 bands, 256x: the published config, and what the tiny one shrinks.
FULL_BIGVGAN: dict[str, Any] = {
    "resblock": "1",
    "num_mels": 80,
    "upsample_rates": [4, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "use_tanh_at_final": False,
    "use_bias_at_final": False,
    "activation": "snakebeta",
    "snake_logscale": True,
    "sampling_rate": 22050,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "fmin": 0,
    "fmax": None,
}
TINY_BIGVGAN = {"upsample_initial_channel": 64, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]]}

# w2v-bert-2.0's real dimensions; the tiny one keeps what the package reads (hidden 1024, 17 layers).
FULL_W2V_BERT: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}
TINY_W2V_BERT: dict[str, Any] = {"num_hidden_layers": 17, "intermediate_size": 64, "conv_depthwise_kernel_size": 3}

# Qwen3-0.6B's shape for the emotion model; tiny: a one-layer model.
FULL_QWEN: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
TINY_QWEN: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}

# A corpus for the text tokenizer: what the normaliser makes of English and Chinese text.
_WORDS = (  # noqa: SIM905 - a paragraph of words reads better than a list of them
    "the a an and or but if then this that these those is are was were be been being have has had do "
    "does did will would can could should may might must shall hello world test speech voice text "
    "sound audio one two three four five six seven eight nine ten hundred thousand dollars percent "
    "time day night good bad happy sad calm angry afraid surprised quick brown fox jumps over lazy "
    "dog every knob passed on emotion from speaker voice itself another recording vectors "
    "description same first second by url all defaults no top k here breaks next works generation of "
    "text to with for in at it we you they he she i me my your our their what where when who why how "
    "yes not very much more most some any each"
).split()
_CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处理府研质"
)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def checkpoint_config(size: Size) -> dict[str, Any]:
    """The ``config.yaml`` of a generated set: the published one, shrunk where the code allows."""
    return FULL_CONFIG if size == "full" else _merge(FULL_CONFIG, TINY_OVERRIDES)


def _hub_snapshot(hub_cache: Path, repo_id: str) -> Path:
    """A snapshot directory in the standard hub cache layout, ``refs/main`` pointing at it."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(f"indextts-api random {repo_id}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def _bpe_model(path: Path, vocab_size: int) -> None:
    import random

    import sentencepiece

    rng = random.Random(0)
    # Each line ends in punctuation, as normalised text does: "," "." "!" "?" must be known tokens.
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)).upper() + rng.choice(",.!?") for _ in range(400)]
    lines += [" ".join(rng.choice(_CJK) for _ in range(16)) + rng.choice("，。！？") for _ in range(200)]
    with tempfile.TemporaryDirectory() as scratch:
        prefix = Path(scratch) / "bpe"
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            hard_vocab_limit=False,
            bos_id=0,
            eos_id=1,
            unk_id=2,
            pad_id=-1,
            minloglevel=2,
        )
        shutil.copy(f"{prefix}.model", path)


def _gpt(config: dict[str, Any], path: Path) -> None:
    import torch
    from indextts.gpt.model_v2 import UnifiedVoice

    gpt = UnifiedVoice(**config["gpt"])
    state = gpt.state_dict()
    # A random GPT would stop (or emit the start token, which is no codebook entry) at any step:
    # bias both away so that every synthesis runs to max_mel_tokens, the same work every time.
    bias = state["mel_head.bias"]
    bias[config["gpt"]["stop_mel_token"]] = -1e4
    bias[config["gpt"]["start_mel_token"]] = -1e4
    torch.save(state, path)


def _s2mel(config: dict[str, Any], path: Path) -> None:
    import torch
    from indextts.s2mel.modules.commons import MyModel
    from omegaconf import OmegaConf

    s2mel = MyModel(OmegaConf.create(config["s2mel"]), use_gpt_latent=True)
    torch.save({"net": {name: module.state_dict() for name, module in s2mel.models.items()}}, path)


def _qwen(path: Path, shape: dict[str, Any]) -> None:
    """A Qwen3 causal LM with a chat-template tokenizer whose first token is end-of-sequence."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(set("".join(_WORDS) + _CJK + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(path)
    qwen_config = Qwen3Config(
        vocab_size=max(len(vocab), 64),
        max_position_embeddings=4096,
        eos_token_id=0,
        bos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=True,
        **shape,
    )
    model = Qwen3ForCausalLM(qwen_config)
    with torch.no_grad():
        # A zero final norm makes every logit zero: greedy decoding picks token 0, end-of-sequence.
        model.model.norm.weight.zero_()
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=0, pad_token_id=2, bos_token_id=1)
    model.save_pretrained(path)


def _w2v_bert(hub_cache: Path, shape: dict[str, Any]) -> None:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    snapshot = _hub_snapshot(hub_cache, W2V_BERT_REPO)
    SeamlessM4TFeatureExtractor().save_pretrained(snapshot)
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**{**FULL_W2V_BERT, **shape}))
    model.save_pretrained(snapshot)


def _semantic_codec(config: dict[str, Any], hub_cache: Path) -> None:
    import safetensors.torch
    from indextts.utils.maskgct_utils import build_semantic_codec
    from omegaconf import OmegaConf

    codec = build_semantic_codec(OmegaConf.create(config["semantic_codec"]))
    target = _hub_snapshot(hub_cache, SEMANTIC_CODEC_REPO) / "semantic_codec" / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(codec, str(target))


def _campplus(hub_cache: Path) -> None:
    import torch
    from indextts.s2mel.modules.campplus.DTDNN import CAMPPlus

    target = _hub_snapshot(hub_cache, CAMPPLUS_REPO) / "campplus_cn_common.bin"
    torch.save(CAMPPlus(feat_dim=80, embedding_size=192).state_dict(), target)


def _bigvgan(repo_id: str, hub_cache: Path, hparams: dict[str, Any]) -> None:
    import torch
    from indextts.s2mel.modules.bigvgan.bigvgan import BigVGAN
    from indextts.s2mel.modules.bigvgan.env import AttrDict

    snapshot = _hub_snapshot(hub_cache, repo_id)
    (snapshot / "config.json").write_text(json.dumps(hparams, indent=2))
    vocoder = BigVGAN(AttrDict(hparams), use_cuda_kernel=False)
    torch.save({"generator": vocoder.state_dict()}, snapshot / "bigvgan_generator.pt")


def _emotion_matrices(config: dict[str, Any], model_dir: Path) -> None:
    import torch

    rows = sum(config["emo_num"])
    torch.save(torch.randn(rows, 192), model_dir / config["spk_matrix"].strip())  # speaker styles (CAMPPlus)
    torch.save(torch.randn(rows, config["gpt"]["model_dim"]) * 0.02, model_dir / config["emo_matrix"].strip())


def generate(model_dir: Path, hub_cache: Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random checkpoint set to ``model_dir`` and its auxiliary models to ``hub_cache``.

    Load it with ``HF_HUB_CACHE=hub_cache HF_HUB_OFFLINE=1``. Returns ``model_dir``.
    """
    import torch
    import yaml

    from indextts_api.engines.torchaudio_compat import import_torchaudio

    import_torchaudio()  # the package's modules import it
    torch.manual_seed(seed)
    config = checkpoint_config(size)
    model_dir.mkdir(parents=True, exist_ok=True)
    hub_cache.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _bpe_model(model_dir / config["dataset"]["bpe_model"], vocab_size=config["gpt"]["number_text_tokens"])
    _gpt(config, model_dir / config["gpt_checkpoint"])
    _s2mel(config, model_dir / config["s2mel_checkpoint"])
    hidden = config["semantic_codec"]["hidden_size"]
    torch.save({"mean": torch.zeros(hidden), "var": torch.ones(hidden)}, model_dir / config["w2v_stat"])
    _emotion_matrices(config, model_dir)
    _qwen(model_dir / config["qwen_emo_path"].strip(), FULL_QWEN if size == "full" else TINY_QWEN)
    _w2v_bert(hub_cache, {} if size == "full" else TINY_W2V_BERT)
    _semantic_codec(config, hub_cache)
    _campplus(hub_cache)
    _bigvgan(config["vocoder"]["name"], hub_cache, FULL_BIGVGAN if size == "full" else {**FULL_BIGVGAN, **TINY_BIGVGAN})
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("hub_cache", type=Path)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.model_dir, args.hub_cache, args.size, args.seed)
    print(f"IndexTTS2 random checkpoints ({args.size}) in {args.model_dir}; HF_HUB_CACHE={args.hub_cache}")


if __name__ == "__main__":
    main()
