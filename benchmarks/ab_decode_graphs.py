"""A/B of the engine's decode CUDA graphs: two or more engine variants in one process,
their graph replays timed in alternation so that clock and thermal drift hit all alike.

A variant is a name plus settings applied while its engine is built and its graphs are
captured: environment variables (UPPER_CASE=value, e.g. MMENGINE_DISABLE_PDL=1), engine
options (lower_case=value, e.g. max_model_len=32768) and entries of the engine's `extra`
dict (extra.key=value, e.g. extra.gemv_max_tokens=8); values are ints where they parse.
Graphs bake in what their kernels were launched with, so settings read at launch time
(like PDL) stay in force for the replays. Qwen2.5-3B text config, random bf16 weights.

    python3 benchmarks/ab_decode_graphs.py --batches 1,16,64 \\
        --variant pdl --variant nopdl MMENGINE_DISABLE_PDL=1

Writes $OUT/ab_decode_graphs.md: per batch and variant, the median of the per-round
medians, and each round's median (the spread shows what one sample is worth).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sampler import time_ms  # noqa: E402
from benchmarks.model_configs import write_config_dir  # noqa: E402
from benchmarks.profile_llm_steps import fill_graph_inputs  # noqa: E402
from benchmarks.report import write_report  # noqa: E402


def parse_variant(items: list[str]) -> tuple[str, dict[str, str], dict[str, object]]:
    """(name, environment, engine options) of a `--variant NAME KEY=VALUE ...`; entries of
    the engine's `extra` dict are gathered under opts["extra"]."""
    name, env, opts = items[0], {}, {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name}: expected KEY=VALUE, got {item!r}")
        parsed = int(value) if value.lstrip("-").isdigit() else value
        if key.isupper():
            env[key] = value
        elif key.startswith("extra."):
            opts.setdefault("extra", {})[key.removeprefix("extra.")] = parsed
        else:
            opts[key] = parsed
    return name, env, opts


def build(cfg_dir: Path, args, env: dict[str, str], opts: dict[str, object]):
    from mmengine import LLM

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kwargs = dict(
            dtype="bfloat16",
            device="cuda",
            skip_tokenizer_init=True,
            multiprocess=False,
            max_model_len=args.ctx + 192,
            max_num_seqs=max(args.batches),
            max_num_batched_tokens=8192,
            num_kv_blocks=max(args.batches) * (-(-args.ctx // 16)) + 64,
            # The start-up warm-up compiles attention shapes of steps these replays never
            # run (~10 s a variant on a fresh machine); the graph captures compile theirs.
            extra={"load_format": "dummy", "kernel_warmup": False},
        )
        extra = {**kwargs["extra"], **opts.get("extra", {})}
        kwargs.update(opts)
        kwargs["extra"] = extra
        return LLM(str(cfg_dir), **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="qwen2.5-3b")
    ap.add_argument("--batches", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--ctx", type=int, default=1152)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="replays timed per round")
    ap.add_argument("--variant", nargs="+", action="append", required=True)
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = write_config_dir(args.config, Path(tmp) / "model")
        t0 = time.perf_counter()
        for name, env, opts in variants:
            engines[name] = build(cfg_dir, args, env, opts)
            print(f"[{time.perf_counter() - t0:.0f} s] built {name}", flush=True)
        lines = [
            f"# decode graph A/B on {torch.cuda.get_device_name(0)}: {args.config}, ctx {args.ctx}",
            "",
            "Graph GPU ms per replay: median of per-round medians (rounds alternate variants).",
            "",
            "| B | variant | ms | per-round medians |",
            "|---|---|---|---|",
        ]
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for b in args.batches:
                graphs = {}
                for name, llm in engines.items():
                    runner = llm._client.core.runner
                    fill_graph_inputs(runner, b, args.ctx, gen)
                    graphs[name] = (runner.graphs.graphs[b].replay, runner.device)
                rounds: dict[str, list[float]] = {name: [] for name in engines}
                for r in range(args.rounds):
                    for name, (replay, dev) in graphs.items():
                        rounds[name].append(time_ms(replay, dev, args.reps))
                    print(f"[{time.perf_counter() - t0:.0f} s] B={b} round {r}", flush=True)
                for name, vals in rounds.items():
                    lines.append(
                        f"| {b} | {name} | {statistics.median(vals):.3f} "
                        f"| {' '.join(f'{v:.3f}' for v in vals)} |"
                    )
                    print(lines[-1], flush=True)
        for llm in engines.values():
            llm.shutdown()
    engines.clear()
    gc.collect()
    write_report("ab_decode_graphs", "\n".join(lines))


if __name__ == "__main__":
    main()
