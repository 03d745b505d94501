"""`make demo`: run a batch through the Python API on a tiny checkpoint built offline.

Until the embedded captioning model lands, the demo builds a tiny random-weight Qwen2
checkpoint (no download: no machine here reaches a model hub), generates for a batch of
prompts with mmengine, and prints each completion and the throughput.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmengine import LLM, SamplingParams  # noqa: E402
from tests.fixtures.checkpoints import build_text_checkpoint  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mmengine-demo-") as tmp:
        ckpt = build_text_checkpoint("qwen2", Path(tmp) / "tiny-qwen2")
        print(f"built a tiny random-weight Qwen2 checkpoint at {ckpt}")
        prompts = [
            f"Question {i}: describe the {color} {shape} in the picture."
            for i, (color, shape) in enumerate(
                (c, s)
                for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "triangle", "star")
            )
        ]
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        with LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256) as llm:
            llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            for out in outputs[:6]:
                print(f"{out.prompt!r}\n  -> {out.outputs[0].text!r}")
            n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
            n_in = sum(len(o.prompt_token_ids) for o in outputs)
            stats = llm.stats()
        print(
            f"\n{len(outputs)} requests, {n_in} prompt + {n_out} output tokens in {elapsed:.2f}s: "
            f"{len(outputs) / elapsed:.1f} req/s, {n_out / elapsed:.1f} output tok/s (CPU, 1 thread)"
        )
        print(
            f"KV blocks used now {stats['kv_blocks_used']}/{stats['kv_blocks_total']}, "
            f"prefix-cache hits {stats['prefix_cache_hit_tokens']}/{stats['prefix_cache_queried_tokens']} tokens"
        )
        print(
            "(random weights: the text is gibberish by design; the embedded captioning model comes next)"
        )


if __name__ == "__main__":
    main()
