"""Held-out accuracy of the default model through mmengine, and agreement with HF.

    .venv/bin/python -m training.evaluate            # 300 images, 150 videos, 300 questions

Every item is a single-turn chat (the media, then "Describe the image." / "Describe the
video." / a question) rendered by the model's chat template, decoded greedily, and
scored by exact string match against the caption or answer generated from the scene
parameters. The held-out seed differs from training's (0) and the monitor's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training import shapes

HELD_OUT_SEED = 20_240_601
MAX_TOKENS = 48  # the longest caption is about 25 tokens


def group_of(ex: shapes.Example) -> str:
    """ "image" / "video" for captions, "qa" for questions (images and videos)."""
    return "qa" if ex.turns[0].task == "qa" else ex.kind


def messages(ex: shapes.Example, media: Any = None) -> list[dict[str, Any]]:
    """The user turn; ``media`` fills the image/video part (HF processors take it there)."""
    part: dict[str, Any] = {"type": ex.kind}
    if media is not None:
        part[ex.kind] = media
    return [{"role": "user", "content": [part, {"type": "text", "text": ex.turns[0].prompt}]}]


def engine_requests(tokenizer: Any, examples: Sequence[shapes.Example]) -> list[dict[str, Any]]:
    """``LLM.generate`` prompts: chat-template text plus the rendered pixels."""
    out = []
    for ex in examples:
        text = tokenizer.apply_chat_template(
            messages(ex), tokenize=False, add_generation_prompt=True
        )
        out.append({"prompt": text, "multi_modal_data": {ex.kind: shapes.render(ex)}})
    return out


def run_engine(llm: Any, examples: Sequence[shapes.Example]) -> list[str]:
    from mmengine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = llm.generate(engine_requests(llm.get_tokenizer(), examples), params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def run_hf(model_dir: str, examples: Sequence[shapes.Example]) -> list[str]:
    """Greedy float32 generation with transformers, one item at a time (no padding)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    texts = []
    for ex in examples:
        prompt = processor.apply_chat_template(messages(ex), add_generation_prompt=True)
        media = shapes.render(ex)
        kw: dict[str, Any] = (
            {"images": [media]}
            if ex.kind == "image"
            else {"videos": [media], "do_sample_frames": False}
        )
        inputs = processor(text=[prompt], return_tensors="pt", **kw)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        texts.append(processor.decode(new, skip_special_tokens=True))
    return texts


def accuracy(examples: Sequence[shapes.Example], texts: Sequence[str]) -> dict[str, list[int]]:
    """Group -> [correct, total] by exact match with the generated ground truth."""
    acc: dict[str, list[int]] = {}
    for ex, text in zip(examples, texts):
        counts = acc.setdefault(group_of(ex), [0, 0])
        counts[0] += text == ex.turns[0].answer
        counts[1] += 1
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded one)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--videos", type=int, default=150)
    p.add_argument("--qa", type=int, default=300)
    p.add_argument("--dtype", default="auto", help="engine dtype (auto = the checkpoint's)")
    p.add_argument("--hf", type=int, default=-1, help="items also run through HF (-1: all)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    from mmengine import LLM
    from mmengine.default_model import default_model_path

    model = args.model or default_model_path()
    examples = shapes.held_out_examples(args.seed, args.images, args.videos, args.qa)
    with LLM(model, dtype=args.dtype, device="cpu") as llm:
        start = time.perf_counter()
        texts = run_engine(llm, examples)
        elapsed = time.perf_counter() - start
    result: dict[str, Any] = {"seed": args.seed, "dtype": args.dtype, "engine_s": elapsed}
    for group, (ok, n) in accuracy(examples, texts).items():
        result[group] = {"correct": ok, "total": n, "accuracy": ok / n}
        print(f"mmengine {group:5s} exact match {ok}/{n} = {ok / n:.1%}")
    print(f"mmengine: {len(examples)} items in {elapsed:.1f}s")
    n_hf = len(examples) if args.hf < 0 else args.hf
    if n_hf:
        # Spread the HF subset over all three groups.
        step = max(1, len(examples) // n_hf)
        picked = list(range(0, len(examples), step))[:n_hf]
        hf_texts = run_hf(model, [examples[i] for i in picked])
        same = sum(hf == texts[i] for hf, i in zip(hf_texts, picked))
        result["hf_agreement"] = {"same": same, "total": len(picked)}
        print(f"HF transformers gives the same text on {same}/{len(picked)} items")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
