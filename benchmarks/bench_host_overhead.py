"""Host (Python) time per engine step, on the CPU with the embedded default model.

The GPU waits while the host schedules, builds the next step's inputs and applies the last
step's outputs (one synchronization per step), so this time adds directly to wall time.
Runs 256 requests x 900 prompt tokens x 64 output tokens in-process and prints the seconds
of the per-step host functions, per step: measured with timers around each function
(default), or under cProfile (`--cprofile`, which inflates call-heavy code ~2x but shows
where inside the time goes with `--top N`).

    python benchmarks/bench_host_overhead.py [--requests 256] [--cprofile [--top 30]]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FUNCS = {
    "schedule": ("scheduler.py", "schedule"),
    "update_from_output": ("scheduler.py", "update_from_output"),
    "prepare": ("model_runner.py", "prepare"),
    "sampling rows": ("model_runner.py", "_row"),
    "sample": ("sampler.py", "sample"),
    "output processing (frontend)": ("output_processor.py", "process"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=900)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--cprofile", action="store_true", help="profile instead of timing")
    ap.add_argument("--top", type=int, default=0, help="with --cprofile: top N by own time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mmengine import LLM, SamplingParams
    from mmengine.default_model import default_model_path

    llm = LLM(
        str(default_model_path()),
        device="cpu",
        dtype="float32",
        multiprocess=False,
        max_num_seqs=args.requests,
        max_num_batched_tokens=8192,
        max_model_len=args.prompt_len + args.output_len + 16,
        skip_tokenizer_init=True,
    )
    rng = np.random.default_rng(0)
    hi = min(llm.vocab_size, 500)
    reqs = [
        {"prompt_token_ids": rng.integers(10, hi, args.prompt_len).tolist()}
        for _ in range(args.requests)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    before = llm.stats()
    timers = None if args.cprofile else _install_timers()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    if args.cprofile:
        prof.enable()
    llm.generate(reqs, params, use_tqdm=False)
    if args.cprofile:
        prof.disable()
    wall = time.perf_counter() - t0
    after = llm.stats()
    llm.shutdown()
    steps = after["num_decode_steps"] - before["num_decode_steps"]
    all_steps = after["num_steps"] - before["num_steps"]
    how = "cProfile cumulative" if args.cprofile else "timers"
    print(f"{args.requests} requests, {all_steps} steps ({steps} decode), wall {wall:.1f} s")
    print(f"| host function ({how}) | s in the run | ms per step |\n|---|---|---|")
    if timers is not None:
        for label, seconds in timers.items():
            print(f"| {label} | {seconds:.3f} | {1e3 * seconds / max(all_steps, 1):.2f} |")
        return
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    for label, (file, func) in FUNCS.items():
        cum = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
        print(f"| {label} | {cum:.3f} | {1e3 * cum / max(all_steps, 1):.2f} |")
    if args.top:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


def _install_timers() -> dict[str, float]:
    """Wraps the per-step host functions with wall-clock timers (seconds per label)."""
    import functools

    from mmengine.model_runner import ModelRunner
    from mmengine.output_processor import OutputProcessor
    from mmengine.scheduler import Scheduler

    totals: dict[str, float] = {}
    targets = {
        "schedule": (Scheduler, "schedule"),
        "update_from_output": (Scheduler, "update_from_output"),
        "prepare": (ModelRunner, "prepare"),
        "sampling rows": (ModelRunner, "_row"),
        "output processing (frontend)": (OutputProcessor, "process"),
    }
    for label, (cls, name) in targets.items():
        fn = getattr(cls, name)
        totals[label] = 0.0

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - t

        setattr(cls, name, functools.wraps(fn)(timed))
    return totals


if __name__ == "__main__":
    main()
