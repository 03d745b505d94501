"""What the engine compiles after start-up (issue 3): Triton JIT variants and Dynamo frames.

A kernel variant compiled mid-run stalls every request of that step for the compile: on a
fresh H200 (session 13) the text benchmark's one step of an odd token count (5,443) took
1.4-2.2 s instead of ~60 ms. This script starts an engine, hooks Triton's JIT compile and
counts Dynamo frames, then drives the kinds of steps serving meets (odd token and sequence
counts, prefix-cache hits, mixed steps, batches above the CUDA-graph sizes, sampling
settings) and lists what each phase compiled and how long the phase took.

    python3 benchmarks/mid_run_compiles.py [--config qwen2.5-3b] [--max-model-len 4096]

Writes $OUT/mid_run_compiles.md. Exit status 1 when anything compiled after start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_configs import CONFIGS, write_config_dir  # noqa: E402


class CompileLog:
    """Triton JIT compiles (kernel name and specialization) and Dynamo frames compiled."""

    def __init__(self) -> None:
        self.triton: list[str] = []

    def install(self) -> None:
        import triton

        started: dict = {}

        def describe(fn, compile) -> str:  # noqa: ANN001
            """Constexpr values and the integer/pointer specializations of one variant."""
            try:
                params = [p.name for p in fn.jit_function.params]
                consts = {params[k[0]]: v for k, v in compile["constants"].items()}
                attrs = compile["configs"][0] if compile["configs"] else {}
                div16 = sorted(params[k[0]] for k, v in attrs.items() if v)
                c = ", ".join(f"{k}={v}" for k, v in consts.items())
                return f"{c}; divisible by 16: {', '.join(div16) or '-'}"
            except Exception as e:  # a Triton version with other hook data
                return f"({type(e).__name__}: {e})"

        def start(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002, ANN001, ANN202
            del repr, fn, compile, is_manual_warmup, already_compiled
            started[str(key)] = time.perf_counter()
            return False

        def done(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002, ANN001, ANN202
            del repr, already_compiled
            secs = time.perf_counter() - started.pop(str(key), time.perf_counter())
            if not is_manual_warmup:
                self.triton.append(f"{fn.name}: {secs:.2f} s: {describe(fn, compile)}")
            return False

        triton.knobs.runtime.jit_cache_hook = start
        triton.knobs.runtime.jit_post_compile_hook = done

    @staticmethod
    def dynamo_frames() -> int:
        from torch._dynamo.utils import counters

        return sum(counters["frames"].values())


def phases(vocab: int, max_len: int):  # noqa: ANN201
    """(name, prompts, SamplingParams kwargs) of the steps serving meets, for a model with
    `vocab` tokens served at `max_len` (>= 256)."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(
            min(100, vocab // 4), vocab - min(1000, vocab // 4), (n,), generator=g
        ).tolist()

    half = max_len // 2
    shared = ids(half)
    lens = torch.randint(50, min(1500, half), (24,), generator=g).tolist()
    two = [ids(33), ids(65)]
    return [
        (f"one prompt of {max_len // 4 + 1} tokens", [ids(max_len // 4 + 1)], {"max_tokens": 3}),
        (f"one prompt of {max_len - 96} tokens", [ids(max_len - 96)], {"max_tokens": 2}),
        ("24 prompts of 50-1500 tokens (mixed steps)", [ids(n) for n in lens], {"max_tokens": 24}),
        ("prefix hit, 17 new tokens", [shared + ids(17)], {"max_tokens": 2}),
        ("prefix hit again, 3 new tokens", [shared + ids(3)], {"max_tokens": 2}),
        ("300 prompts of 7 tokens", [ids(7) for _ in range(300)], {"max_tokens": 4}),
        ("sampling: temperature 0.8", two, {"max_tokens": 6, "temperature": 0.8}),
        ("sampling: top-p 0.9, top-k 20", two, {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 20}),
        ("sampling: top-k 200, min-p 0.05", two, {"max_tokens": 6, "top_k": 200, "min_p": 0.05}),
        ("sampling: seed 1", two, {"max_tokens": 6, "temperature": 0.8, "seed": 1}),
        ("sampling: presence penalty 0.5", two, {"max_tokens": 6, "presence_penalty": 0.5}),
        ("sampling: logprobs 3", two, {"max_tokens": 6, "logprobs": 3}),
        ("sampling: n=2", two, {"max_tokens": 6, "temperature": 0.8, "n": 2}),
        ("greedy", [ids(21) for _ in range(5)], {"max_tokens": 6, "temperature": 0.0}),
        (f"long context decode, {max_len - 60} tokens", [ids(max_len - 60)], {"max_tokens": 40}),
        ("37 prompts of odd lengths", [ids(5 + (97 + 53 * i) % half) for i in range(37)], {"max_tokens": 5}),
    ]  # fmt: skip


def vlm_phases():  # noqa: ANN201
    """Image prompts (Qwen2.5-VL token ids) of sizes a server meets: (name, prompts, kw)."""
    from benchmarks.bench_mm_throughput import IMAGE_PAD, VISION_END, VISION_START, noise_image

    g = torch.Generator().manual_seed(2)

    def prompt(sizes: list[tuple[int, int]], text: int = 40) -> dict:
        ids = []
        for _ in sizes:
            ids += [VISION_START, IMAGE_PAD, VISION_END]
        ids += torch.randint(1000, 150000, (text,), generator=g).tolist()
        images = [noise_image(7 * w + h, w, h) for w, h in sizes]
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}

    return [
        ("one 256x256 image", [prompt([(256, 256)])], {"max_tokens": 4}),
        ("one 1280x720 image", [prompt([(1280, 720)])], {"max_tokens": 4}),
        ("one 333x517 image", [prompt([(333, 517)])], {"max_tokens": 4}),
        ("two images, 640x480 + 100x900", [prompt([(640, 480), (100, 900)])], {"max_tokens": 4}),
        ("8 prompts of odd sizes", [prompt([(97 + 61 * i, 211 + 37 * i)]) for i in range(8)], {"max_tokens": 8}),
        ("a 1920x1080 image", [prompt([(1920, 1080)])], {"max_tokens": 4}),
    ]  # fmt: skip


def run_phases(llm, log: CompileLog, vocab: int, max_len: int, vlm: bool = False) -> list[tuple]:  # noqa: ANN001
    """Each phase's (name, wall s, Dynamo frames, Triton kernels by name, variants)."""
    from mmengine import SamplingParams

    rows = []
    if vlm:
        todo = vlm_phases()
    else:
        todo = [
            (n, [{"prompt_token_ids": p} for p in ps], kw) for n, ps, kw in phases(vocab, max_len)
        ]
    for name, prompts, kw in todo:
        n_triton, n_frames = len(log.triton), log.dynamo_frames()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(ignore_eos=True, **kw), use_tqdm=False)
        wall = time.perf_counter() - t
        new = log.triton[n_triton:]
        frames = log.dynamo_frames() - n_frames
        kinds = Counter(s.split(":")[0] for s in new)
        rows.append((name, wall, frames, kinds, new))
        print(f"{name}: {wall:.2f} s, triton {dict(kinds)}, dynamo frames {frames}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen2.5-3b", choices=sorted(CONFIGS))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--engine-extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--vlm",
        action="store_true",
        help="Qwen2.5-VL-3B (random weights saved once) with images of many sizes, in one "
        "process (multiprocess=False) so that the vision encoder's compiles are seen too",
    )
    args = ap.parse_args()
    from mmengine import LLM

    extra: dict = {"load_format": "dummy"}
    for item in args.engine_extra:
        k, _, v = item.partition("=")
        extra[k] = int(v)
    log = CompileLog()
    with tempfile.TemporaryDirectory() as tmp:
        if args.vlm:
            from benchmarks.bench_mm_throughput import build_checkpoint

            args.config = "qwen2.5-vl-3b"
            extra.pop("load_format")
            cfg_dir = build_checkpoint(Path(tmp))
        else:
            cfg_dir = write_config_dir(args.config, Path(tmp))
        t0 = time.perf_counter()
        llm = LLM(
            str(cfg_dir), dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
            max_model_len=args.max_model_len, multiprocess=False, extra=extra,
            num_input_workers=0 if args.vlm else 1,
        )  # fmt: skip
        startup = time.perf_counter() - t0
        log.install()
        vocab = CONFIGS[args.config]["vocab_size"]
        rows = run_phases(llm, log, vocab, args.max_model_len, vlm=args.vlm)
        total = sum(len(new) + frames for _, _, frames, _, new in rows)
        llm.shutdown()
    dev = torch.cuda.get_device_name()
    lines = [
        f"# Compiles after start-up: {args.config}, max_model_len {args.max_model_len}, {dev}",
        "",
        f"Start-up {startup:.1f} s. extra={extra}.",
        "",
        "| phase | wall s | Triton kernels compiled | Dynamo frames |",
        "|---|---|---|---|",
    ]
    for name, wall, frames, kinds, _ in rows:
        k = ", ".join(f"{n} x{c}" for n, c in kinds.items()) or "-"
        lines.append(f"| {name} | {wall:.2f} | {k} | {frames} |")
    lines += ["", "Variants compiled (name: signature):", ""]
    lines += [f"- {s[:1500]}" for *_, new in rows for s in new] or ["- none"]
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "mid_run_compiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 12 + len(rows)]))
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
