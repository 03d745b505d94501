"""Everything in the default model's folder except the weights: tokenizer, configs, card.

The folder follows the published Qwen2-VL hub layout (flat config.json with
``rope_scaling: {type: mrope}``, weights named ``visual.*`` / ``model.*`` / ``lm_head.*``,
standalone preprocessor_config.json and video_preprocessor_config.json), so both
transformers 4 and 5 and mmengine load it like any hub checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from training import shapes

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenizer split (letters with one leading non-letter, single digits,
# punctuation runs, newlines, spaces): the same token boundaries as the real model.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen2-VL writes it, minus the default system turn (prompts stay short; a
# system message, when given, is rendered and the model was trained with one). Media
# parts become <|vision_start|><|image_pad|><|vision_end|>, which the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url', 'input_image'] %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ['video', 'video_url'] %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Clip's normalisation, as every Qwen2-VL processor config uses.
_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]
# min = max pixels: an 84 x 84 input keeps its size (6 x 6 patches, 9 tokens) and any
# other input is resized to about that area, the only scale the model has seen.
IMAGE_PIXELS = shapes.IMAGE_SIZE * shapes.IMAGE_SIZE
VIDEO_PIXELS = shapes.VIDEO_SIZE * shapes.VIDEO_SIZE


@dataclass(frozen=True)
class ModelDims:
    """The sizes of the default model; see the model card for why these."""

    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 3
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    vision_depth: int = 3
    vision_embed_dim: int = 128
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    # (temporal, height, width) rotary pairs; sums to head_dim / 2 (Qwen2-VL: 16/24/24).
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    # Width gets the slowest rotary pairs. At 1e4 they turn ~0.003 rad from one image
    # column to the next, so the LLM could hardly tell left from right; at 20 they turn
    # 0.06-0.15 rad (height 0.19-0.47), while the slowest pair still spans ~100 tokens.
    rope_theta: float = 20.0
    max_position_embeddings: int = 2048
    # About 1 / sqrt(hidden): at the usual 0.02 attention starts so uniform that the LLM
    # took well over 600 steps to start looking at the shapes instead of the background.
    initializer_range: float = 0.06


# ---- tokenizer ---------------------------------------------------------------------------


def tokenizer_corpus(seed: int = 0, num_examples: int = 4000) -> list[str]:
    """Every word the model reads or writes, in its real contexts, plus chat words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_examples):
        ex = shapes.sample_example(rng)
        for turn in ex.turns:
            lines += [turn.prompt, turn.answer]
    lines += [
        "user assistant system",
        SYSTEM_PROMPT,
        "Hello! Please describe this picture. What do you see? Thanks.",
    ]
    return lines


def build_tokenizer(seed: int = 0) -> Tokenizer:
    """A byte-level BPE over the shapes vocabulary (every word becomes one token) with the
    Qwen special tokens appended, so any other text still encodes, byte by byte."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: merging stops once every word is one token
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config() -> dict:
    return {
        # Loads as a fast tokenizer in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "extra_special_tokens": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        "chat_template": CHAT_TEMPLATE,
    }


# ---- configs -----------------------------------------------------------------------------


def padded_vocab(tokenizer_len: int) -> int:
    """Real checkpoints pad the embedding table to a round size above the tokenizer."""
    return (tokenizer_len + 63) // 64 * 64


def model_config(dims: ModelDims, tok: Tokenizer) -> dict:
    """config.json in the flat hub layout of Qwen/Qwen2-VL-2B-Instruct."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    head_dim = dims.hidden_size // dims.num_attention_heads
    assert sum(dims.mrope_section) * 2 == head_dim, "mrope_section must cover head_dim / 2"
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": padded_vocab(tok.get_vocab_size(with_added_tokens=True)),
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": dims.max_position_embeddings,
        "initializer_range": dims.initializer_range,
        "rms_norm_eps": 1e-6,
        "rope_theta": dims.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(dims.mrope_section)},
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": dims.num_hidden_layers,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": dims.vision_depth,
            "embed_dim": dims.vision_embed_dim,
            "hidden_size": dims.hidden_size,  # the merger's output width: the LLM's
            "hidden_act": "quick_gelu",
            "mlp_ratio": dims.vision_mlp_ratio,
            "num_heads": dims.vision_heads,
            "in_chans": 3,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": dims.initializer_range,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.51.0",
    }


def _pixel_settings(pixels: int) -> dict:
    return {
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _MEAN,
        "image_std": _STD,
        "do_convert_rgb": True,
        # Older readers take min/max_pixels, newer ones size; both say the same.
        "min_pixels": pixels,
        "max_pixels": pixels,
        "size": {"shortest_edge": pixels, "longest_edge": pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def processor_configs() -> dict[str, dict]:
    """File name -> content of the processor files."""
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        **_pixel_settings(IMAGE_PIXELS),
    }
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2VLProcessor",
        **_pixel_settings(VIDEO_PIXELS),
        # Frames handed over are used as they are; a video file is sampled at 2 fps.
        "do_sample_frames": False,
        "cap_pixels_per_frame": False,  # a 4-frame clip is 18 tokens either way
        "fps": 2.0,
        "min_frames": shapes.VIDEO_FRAMES,
        "max_frames": 64,
    }
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": {"processor_class": "Qwen2VLProcessor"},
        "chat_template.json": {"chat_template": CHAT_TEMPLATE},
    }


def generation_config(tok: Tokenizer) -> dict:
    return {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        # Captions have one right answer: greedy decoding.
        "do_sample": False,
        "max_new_tokens": 64,
        "transformers_version": "4.51.0",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_model_files(out: Path, dims: ModelDims, tok: Tokenizer) -> None:
    """Writes every file of the folder except model.safetensors and README.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    _write_json(out / "config.json", model_config(dims, tok))
    _write_json(out / "generation_config.json", generation_config(tok))
    for name, data in processor_configs().items():
        _write_json(out / name, data)


# ---- weights -----------------------------------------------------------------------------

# transformers 5 module names -> published hub names (what transformers 4 and mmengine read).
_HUB_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under hub names, contiguous and detached, for safetensors."""
    out = {}
    for name, t in model.state_dict().items():
        for old, new in _HUB_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = t.detach().contiguous().clone()
    return out
