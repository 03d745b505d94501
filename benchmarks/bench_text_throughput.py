"""Offline text throughput (W1 text shape) and batch-1 decode latency, on one GPU.

mmengine vs HF transformers ``generate`` (best of batch 16/32/64) vs HF ``generate_batch``
(continuous batching, ``paged|sdpa``), same card, same config (Qwen2.5-3B text, random
bf16 weights), same requests: N prompts of random token ids, exactly M output tokens.
Also measures the card's ceilings (copy bandwidth, bf16 matmul rate) and reports each
result against its floor. Writes a markdown table to $OUT/text_throughput.md.

    python benchmarks/bench_text_throughput.py --num-requests 200 --prompt-len 1024 --output-len 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_configs import CONFIGS, num_params, write_config_dir  # noqa: E402


def ceilings() -> dict[str, float]:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * 20 / (time.perf_counter() - t0)
    # Read-only rate (what a decode step's weight stream is bounded by): a sum of 1 GiB.
    x = a.view(torch.bfloat16)
    for _ in range(3):
        x.sum()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        x.sum()
    torch.cuda.synchronize()
    read_bw = n * 20 / (time.perf_counter() - t0)
    del a, b, x
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        m @ m
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        m @ m
    torch.cuda.synchronize()
    flops = 2 * 8192**3 * 10 / (time.perf_counter() - t0)
    del m
    torch.cuda.empty_cache()
    return {"copy_GBps": bw / 1e9, "read_GBps": read_bw / 1e9, "matmul_TFLOPs": flops / 1e12}


def make_requests(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1000, (n, prompt_len), generator=g).tolist()


def add_gemv_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--gemv-max-tokens",
        type=int,
        default=None,
        help="decode steps of at most this many tokens use the fused GEMV layer path "
        "(0: off; default: the engine's)",
    )
    ap.add_argument(
        "--engine-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine `extra` option (integer value), e.g. gemv_rope=0; repeatable",
    )


def gemv_option(args) -> dict:
    """Engine `extra` options from the command line: `gemv_max_tokens` when set, and each
    `--engine-extra KEY=VALUE`."""
    gemv = getattr(args, "gemv_max_tokens", None)
    opts = {} if gemv is None else {"gemv_max_tokens": gemv}
    for item in getattr(args, "engine_extra", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-extra takes KEY=VALUE, got {item!r}")
        opts[key] = int(value)
    return opts


def bench_mmengine(cfg_dir: Path, reqs, out_len: int, args, budget: int, trace: str) -> dict:
    """One mmengine run at a token budget of `budget` a step; `trace`: a step-trace file
    to write (MMENGINE_STEP_TRACE for this engine only), or ""."""
    from mmengine import LLM, SamplingParams
    from mmengine.step_trace import ENV as TRACE_ENV

    os.environ[TRACE_ENV] = trace  # read when the engine core starts
    t0 = time.perf_counter()
    llm = LLM(
        str(cfg_dir),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        async_scheduling=args.async_scheduling,
        max_model_len=args.prompt_len + out_len + 64,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=budget,
        enforce_eager=args.enforce_eager,
        extra={"load_format": "dummy", **gemv_option(args)},
    )
    startup = time.perf_counter() - t0
    p = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": r} for r in reqs[:4]], p, use_tqdm=False)  # warm-up
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r} for r in reqs], p, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = llm.stats()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if args.torch_profile:
        profile_run(llm, args, budget, len(reqs[0]), p)
    b1_ms = batch1_ms_per_token(llm, reqs[0][: args.prompt_len])
    stats = llm.stats()
    llm.shutdown()
    profile = {
        k: round(after[k] - before[k], 3)
        for k in after
        if k.startswith(("time_", "num_prefill", "num_decode"))
    }
    return {
        "system": f"mmengine ({_mode(args)}, {budget}-token steps)",
        "wall_s": wall,
        "output_tokens": n_out,
        "startup_s": startup,
        "decode_step_b1_ms": b1_ms,
        "kv_blocks": stats["kv_blocks_total"],
        "preemptions": stats["num_preemptions"],
        "profile": profile,
    }


def profile_run(llm, args, budget: int, prompt_len: int, params) -> None:  # noqa: ANN001
    """The same workload again (fresh prompts: no prefix-cache hits) under torch.profiler;
    writes the trace and its summary (benchmarks/profile_w1.py --analyse) to
    `args.torch_profile`/trace.<budget>.json.gz and .md. Not timed as the benchmark."""
    from benchmarks.profile_w1 import analyse, load_trace

    out = Path(args.torch_profile)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"trace.{budget}.json.gz"
    reqs = make_requests(args.num_requests, prompt_len, CONFIGS[args.config]["vocab_size"], seed=1)
    llm.start_profile(trace)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    llm.stop_profile()
    text = analyse(load_trace(trace), wall, None)
    (out / f"trace.{budget}.md").write_text(text)
    print(f"torch.profiler, {budget}-token steps:\n{text}", flush=True)


def batch1_ms_per_token(llm, prompt: list[int], k: int = 128) -> float:  # noqa: ANN001
    """Batch-1 decode time per token: (generate 1 + k tokens) - (generate 1 token), over k,
    for one request of `prompt` (default sampling: temperature 1)."""
    from mmengine import SamplingParams

    one = {"prompt_token_ids": prompt}
    # Twice: the second run hits the prefix cache, a prefill chunk shape of its own.
    for _ in range(2):
        llm.generate(one, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(one, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate(one, SamplingParams(max_tokens=1 + k, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / k * 1e3


def _hf_model(cfg_dir: Path, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation=attn
        )
    return model.eval()


def bench_hf_generate(cfg_dir: Path, reqs, out_len: int, batch_sizes) -> list[dict]:
    model = _hf_model(cfg_dir, "sdpa")
    rows = []
    for bs in batch_sizes:
        torch.cuda.synchronize()
        with torch.no_grad():
            x = torch.tensor(reqs[:bs], device="cuda")
            model.generate(
                x[:, :32], max_new_tokens=4, min_new_tokens=4, do_sample=False
            )  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n_out = 0
            for i in range(0, len(reqs), bs):
                x = torch.tensor(reqs[i : i + bs], device="cuda")
                g = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=out_len,
                    min_new_tokens=out_len,
                    do_sample=False,
                    pad_token_id=0,
                )
                n_out += (g.shape[1] - x.shape[1]) * x.shape[0]
            torch.cuda.synchronize()
        rows.append(
            {
                "system": f"HF generate (batch {bs})",
                "wall_s": time.perf_counter() - t0,
                "output_tokens": n_out,
            }
        )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_hf_generate_batch(cfg_dir: Path, reqs, out_len: int) -> dict:
    from transformers import GenerationConfig

    model = _hf_model(cfg_dir, "paged|sdpa")
    gen = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch(inputs=reqs[:4], generation_config=gen)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = model.generate_batch(inputs=reqs, generation_config=gen)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n_out = sum(len(r.generated_tokens) for r in res.values())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"system": "HF generate_batch (paged|sdpa)", "wall_s": wall, "output_tokens": n_out}


def _mode(args) -> str:
    mode = "eager" if args.enforce_eager else "compile+graphs"
    if args.async_scheduling is False:
        mode += ", sync steps"
    return mode


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="qwen2.5-3b", choices=sorted(CONFIGS))
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument(
        "--max-num-batched-tokens",
        default="8192",
        help="mmengine's token budget a step; a comma list runs mmengine once per value "
        "(default: 8192)",
    )
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan each step while the GPU runs the previous one (default: the engine's, on)",
    )
    add_gemv_argument(ap)
    ap.add_argument(
        "--torch-profile",
        default="",
        metavar="DIR",
        help="after each timed mmengine run, run the workload again under torch.profiler and "
        "write DIR/trace.<budget>.json.gz with its summary (.md)",
    )
    ap.add_argument("--systems", default="mmengine,hf_generate,hf_generate_batch")
    ap.add_argument("--hf-batch-sizes", default="16,32,64")
    args = ap.parse_args()

    out_dir = Path(os.environ.get("OUT", "."))
    cfg = CONFIGS[args.config]
    card = torch.cuda.get_device_name()
    ceil = ceilings()
    print(
        f"card {card}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s",
        flush=True,
    )
    reqs = make_requests(args.num_requests, args.prompt_len, cfg["vocab_size"])
    budgets = [int(x) for x in args.max_num_batched_tokens.split(",")]
    base_trace = os.environ.get("MMENGINE_STEP_TRACE", "")
    rows: list[dict] = []
    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = write_config_dir(args.config, Path(tmp) / args.config)
        for system in systems:
            try:
                if system == "mmengine":
                    for budget in budgets:
                        trace = base_trace
                        if base_trace and len(budgets) > 1:
                            trace = str(Path(base_trace).with_suffix(f".{budget}.jsonl"))
                        try:
                            rows.append(
                                bench_mmengine(cfg_dir, reqs, args.output_len, args, budget, trace)
                            )
                        except Exception as e:  # the other budgets still run
                            rows.append(
                                {
                                    "system": f"mmengine ({budget})",
                                    "error": f"{type(e).__name__}: {e}"[:300],
                                }
                            )
                        print(json.dumps(rows[-1]), flush=True)
                    continue
                elif system == "hf_generate":
                    rows.extend(
                        bench_hf_generate(
                            cfg_dir,
                            reqs,
                            args.output_len,
                            [int(x) for x in args.hf_batch_sizes.split(",")],
                        )
                    )
                elif system == "hf_generate_batch":
                    rows.append(bench_hf_generate_batch(cfg_dir, reqs, args.output_len))
            except Exception as e:  # a peer that cannot run is reported, not skipped
                rows.append({"system": system, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), flush=True)

    params = num_params(cfg)
    weight_bytes = 2 * params
    # Until session 7 this divided by half the copy rate, but the copy rate already counts
    # read + write traffic, so that floor was twice too high; now a measured read rate.
    floor_b1_ms = weight_bytes / (ceil["read_GBps"] * 1e9) * 1e3
    total_tokens = args.num_requests * (args.prompt_len + args.output_len)
    # Every token goes through the decoder layers; only the positions that sample a token
    # (one per output token) go through the LM head, and the embedding is a lookup. (Until
    # session 7 all parameters counted for every token: a floor ~9% too high.)
    head = cfg["vocab_size"] * cfg["hidden_size"]
    layer_params = params - head * (1 if cfg["tie_word_embeddings"] else 2)
    flops = 2 * layer_params * total_tokens + 2 * head * args.num_requests * args.output_len
    flops_floor_s = flops / (ceil["matmul_TFLOPs"] * 1e12)
    lines = [
        f"### Offline text throughput — {args.config} (random bf16 weights), {card}",
        "",
        f"{args.num_requests} requests x {args.prompt_len} prompt tokens x {args.output_len} output tokens (ignore_eos, greedy). "
        f"Ceilings measured in this run: copy {ceil['copy_GBps']:.0f} GB/s (read+write), read {ceil['read_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s. "
        f"Matmul floor ({layer_params / 1e9:.2f}B decoder-layer params for every token, the LM head for every output token): {flops_floor_s:.2f} s.",
        "",
        "| system | wall s | req/s | output tok/s | total tok/s | x HF generate best | FLOP floor / wall |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = [r for r in rows if "error" not in r]
    hf_best = min(
        (r["wall_s"] for r in ok if r["system"].startswith("HF generate (")), default=None
    )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} | | | | | |")
            continue
        w = r["wall_s"]
        speed = f"{hf_best / w:.1f}x" if hf_best else "-"
        lines.append(
            f"| {r['system']} | {w:.2f} | {args.num_requests / w:.2f} | {r['output_tokens'] / w:.0f} | "
            f"{(args.num_requests * args.prompt_len + r['output_tokens']) / w:.0f} | {speed} | {flops_floor_s / w:.0%} |"
        )
    for r in (r for r in ok if r["system"].startswith("mmengine")):
        pr = r.get("profile", {})
        lines += ["", f"**{r['system']}**"]
        if pr:
            lines += [
                "",
                "Engine-core profile of the timed run (s): "
                + ", ".join(f"{k.replace('time_', '')} {v}" for k, v in pr.items()),
            ]
        lines += [
            "",
            f"Batch-1 decode step: {r['decode_step_b1_ms']:.2f} ms; weight-read floor {floor_b1_ms:.2f} ms "
            f"({weight_bytes / 1e9:.2f} GB / {ceil['read_GBps']:.0f} GB/s read) -> {r['decode_step_b1_ms'] / floor_b1_ms:.2f}x the floor. "
            f"Start-up (load + profile + compile + graph capture): {r['startup_s']:.0f} s; KV blocks {r['kv_blocks']}, preemptions {r['preemptions']}.",
        ]
    text = "\n".join(lines)
    print(text)
    (out_dir / "text_throughput.md").write_text(text + "\n")
    (out_dir / "text_throughput.json").write_text(
        json.dumps({"card": card, "ceilings": ceil, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
