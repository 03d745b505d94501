"""A random-weight checkpoint of a published model shape that `mmengine serve` can serve.

W1 feeds token ids straight to the engine, but the HTTP and chat workloads (W2
`bench_serving.py`, W4 `bench_cache_reuse.py`) need a tokenizer, a chat template and the
processor files beside the weights. No machine here reaches a model hub, so the checkpoint
borrows the embedded default model's tokenizer (Qwen2-VL style, 454 tokens, the Qwen chat
template), and the checkpoint's special-token ids (image, video, vision start/end, bos, eos,
pad) are rewritten to that tokenizer's. The vocabulary (embedding rows) keeps the published
size, so the step costs are the real model's, but the embedding rows past the tokenizer are
zeroed (LM head too: it is tied, or zeroed alike): their logits are then 0, below the
largest of the tokenizer's ids, so greedy decoding emits only ids with text. (Ids past the
tokenizer decode to nothing and stream no content, which would leave W2 without a first
token to time.)

    python3 benchmarks/random_checkpoint.py OUT_DIR [--config qwen2.5-vl-3b] [--device cuda]
        [--no-tokenizer]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_configs import CONFIGS, QWEN_VL_PREPROCESSOR  # noqa: E402

# Files of the embedded default model that carry the tokenizer and the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json")
SPECIAL_IDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_id",
    "video_token_id",
)


def build_random_checkpoint(
    config: dict[str, Any],
    out: Path,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: bool = True,
) -> Path:
    """Random weights of `config` (HF `from_config`, seed 0) saved to `out`, with the Qwen-VL
    image preprocessor config for vision models and, with `tokenizer`, the borrowed
    tokenizer. Returns `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    hf_config = AutoConfig.from_pretrained(out)
    vision = "vision_config" in config
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(hf_config, dtype=dtype)
    if tokenizer:
        keep = _embedded_vocab_size()
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                emb.weight[keep:] = 0
    model.save_pretrained(out)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if vision:
        (out / "preprocessor_config.json").write_text(json.dumps(QWEN_VL_PREPROCESSOR))
    if tokenizer:
        borrow_embedded_tokenizer(out)
    return out


def _embedded_vocab_size() -> int:
    from transformers import AutoTokenizer

    from mmengine.default_model import default_model_path

    return len(AutoTokenizer.from_pretrained(str(default_model_path())))


def borrow_embedded_tokenizer(out: Path) -> None:
    """Copies the embedded default model's tokenizer files into checkpoint `out` and writes
    that tokenizer's special-token ids into its config.json and generation_config.json."""
    from mmengine.default_model import default_model_path

    src = Path(default_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    ids = {
        k: v for k, v in json.loads((src / "config.json").read_text()).items() if k in SPECIAL_IDS
    }
    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.exists():
            path.write_text(json.dumps(_with_ids(json.loads(path.read_text()), ids), indent=1))


def _with_ids(cfg: Any, ids: dict[str, Any]) -> Any:  # noqa: ANN401 - any JSON value
    """`cfg` with every special-id key, at any depth (text_config, vision_config), set to
    the tokenizer's; nested configs that lack a key are left without it."""
    if isinstance(cfg, dict):
        return {k: ids[k] if k in ids else _with_ids(v, ids) for k, v in cfg.items()}
    return cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path, help="folder to write the checkpoint to")
    ap.add_argument("--config", default="qwen2.5-vl-3b", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda", help="where to initialize the weights")
    ap.add_argument("--no-tokenizer", action="store_true", help="weights and configs only")
    args = ap.parse_args(argv)
    path = build_random_checkpoint(
        CONFIGS[args.config], args.out, device=args.device, tokenizer=not args.no_tokenizer
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
