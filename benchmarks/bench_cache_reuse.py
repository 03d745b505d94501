"""W4 cache reuse (../shared/BENCHMARKS.md): how much the prefix cache and the embedding
cache save when requests resend the same images. Two workloads, each run on a fresh engine
with the caches on (the defaults) and off (`enable_prefix_caching=False`,
`mm_embedding_cache_gib=0`):

- shared image: `--images` noise images, each asked `--questions` different questions
  (random words), all in one `generate` call;
- multi-turn: `--conversations` chats of `--turns` turns; every turn resends the chat's
  image and its whole history, the assistant turns being the engine's own replies (turn t of
  every chat in one call, then turn t + 1).

Reports wall time, requests/s, the prefix-cache hit rate (hit / looked-up prompt tokens),
embedding-cache hits and misses, encoder runs, and the speedup of caching on over off.
Greedy, `--max-tokens` per reply.

    python3 benchmarks/bench_cache_reuse.py [MODEL] [--images 8 --questions 8]
        [--conversations 16 --turns 4] [--device cuda]

Writes $OUT/cache_reuse.md and cache_reuse.json (OUT defaults to the current folder).

On a GPU, at the published Qwen2.5-VL-3B shape (random weights, the embedded model's
tokenizer; no hub needed):

    python3 benchmarks/random_checkpoint.py /tmp/vl3b
    python3 benchmarks/bench_cache_reuse.py /tmp/vl3b --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serving import WORDS  # noqa: E402
from benchmarks.report import write_report  # noqa: E402

COUNTERS = (
    "prefix_cache_queried_tokens",
    "prefix_cache_hit_tokens",
    "mm_prefix_cache_hit_tokens",
    "embedding_cache_hits",
    "embedding_cache_misses",
    "encoder_runs",
)


def noise_image(seed: int, width: int, height: int):  # noqa: ANN201
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n).tolist())


def user_turn(image, text: str) -> dict:  # noqa: ANN001
    return {
        "role": "user",
        "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
    }


def shared_image(llm, args, params) -> int:  # noqa: ANN001
    """K images x M questions in one call; returns the number of requests."""
    rng = np.random.default_rng(1)
    size = args.image_size
    convs = [
        [user_turn(noise_image(100 + k, *size), words(rng, args.question_words))]
        for k in range(args.images)
        for _ in range(args.questions)
    ]
    llm.chat(convs, params, use_tqdm=False)
    return len(convs)


def multi_turn(llm, args, params) -> int:  # noqa: ANN001
    """C chats x T turns, each turn resending the image and the history."""
    rng = np.random.default_rng(2)
    images = [noise_image(200 + c, *args.image_size) for c in range(args.conversations)]
    chats: list[list[dict]] = [[] for _ in images]
    for _ in range(args.turns):
        for c, chat in enumerate(chats):
            # Each user turn shows the chat's image again, as clients resending it do.
            chat.append(user_turn(images[c], words(rng, args.question_words)))
        outs = llm.chat(chats, params, use_tqdm=False)
        for chat, out in zip(chats, outs):
            chat.append({"role": "assistant", "content": out.outputs[0].text})
    return args.conversations * args.turns


def run(args, workload, caching: bool) -> dict:  # noqa: ANN001
    from mmengine import LLM, SamplingParams

    kwargs = {} if caching else {"enable_prefix_caching": False, "mm_embedding_cache_gib": 0.0}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(args.model, device=args.device, max_model_len=args.max_model_len, **kwargs) as llm:
        # Start-up work (compiles, graph captures) outside the timed part, on other images.
        warm = [[user_turn(noise_image(7, *args.image_size), "hello")]]
        llm.chat(warm, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        before = llm.stats()
        t0 = time.perf_counter()
        n = workload(llm, args, params)
        wall = time.perf_counter() - t0
        after = llm.stats()
    delta = {k: after[k] - before[k] for k in COUNTERS}
    queried = max(delta["prefix_cache_queried_tokens"], 1)
    return {
        "workload": workload.__name__.replace("_", " "),
        "caching": "on" if caching else "off",
        "requests": n,
        "wall_s": wall,
        "req_per_s": n / wall,
        "prefix_hit_rate": delta["prefix_cache_hit_tokens"] / queried,
        **delta,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", nargs="?", default=None, help="checkpoint (default: embedded model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--question-words", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-size", default="448x448")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    args = ap.parse_args()
    args.image_size = tuple(int(v) for v in args.image_size.split("x"))
    if args.model is None:
        from mmengine.default_model import default_model_path

        args.model = str(default_model_path())

    rows = []
    for workload in (shared_image, multi_turn):
        for caching in (True, False):
            rows.append(run(args, workload, caching))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"### W4 cache reuse — {Path(args.model).name}, device {args.device}",
        "",
        f"shared image: {args.images} images x {args.questions} questions; multi-turn: "
        f"{args.conversations} chats x {args.turns} turns; {args.image_size[0]}x"
        f"{args.image_size[1]} noise images, {args.question_words}-word questions, "
        f"{args.max_tokens} reply tokens (greedy, ignore_eos).",
        "",
        "| workload | caches | requests | wall s | req/s | prefix hit rate | embedding cache "
        "hits / misses | encoder runs | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for on, off in zip(rows[::2], rows[1::2]):
        for r in (on, off):
            speedup = f"{off['wall_s'] / on['wall_s']:.2f}x" if r is on else ""
            lines.append(
                f"| {r['workload']} | {r['caching']} | {r['requests']} | {r['wall_s']:.2f} "
                f"| {r['req_per_s']:.1f} | {r['prefix_hit_rate']:.0%} "
                f"| {r['embedding_cache_hits']} / {r['embedding_cache_misses']} "
                f"| {r['encoder_runs']} | {speedup} |"
            )
    text = "\n".join(lines)
    write_report("cache_reuse", text, rows)


if __name__ == "__main__":
    main()
