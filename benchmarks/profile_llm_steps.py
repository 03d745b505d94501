"""Where an LLM step's GPU time goes, against its floor (issue 3): decode and prefill.

Builds the engine in-process on the Qwen2.5-3B text config (random bf16 weights).

Decode: writes B sequences of `ctx` tokens over shuffled KV blocks into the input buffers
of the decode CUDA graph captured for B, and for each B reports:
  - the graph's GPU time per replay (CUDA events around replays: no host time in it) and
    its floor: the weights it reads (every layer; the LM head runs outside the graph) plus
    the K/V of B x ctx positions, over the card's measured read bandwidth;
  - the LM head + greedy argmax after it, against the LM head's weight bytes;
  - one replay's kernels from torch.profiler: GPU time by kind, kernel count, top kernels,
    and the host time of one graph launch;
and the engine's own per-token time at batch 1 (generate 1 + k tokens minus 1 token, over
k), whose difference to the graph is host-side cost the GPU waits for.

Prefill: `--prefill-seqs` fresh prompts of `--prefill-len` tokens in one step (the text
benchmark's 8 x 1024), generating one token; GPU kernel time by kind against the matmul
floor of the step's GEMMs and attention at the measured bf16 matmul rate, and the top
kernels.

Mixed (`--mixed-decodes D`): the text benchmark's costly step, prompt chunks with D decodes
riding along in one token budget. D requests decode (prompts of ctx - 128 tokens), then each
profiled step gets `--prefill-seqs` fresh prompts; its kernels by kind are set beside the
prefill-only step's, so the decodes' extra cost shows where it lands (GEMM, attention, ...).

    python3 benchmarks/profile_llm_steps.py [--batches 1,16,64,192] [--ctx 1152]
        [--prefill-seqs 8 --prefill-len 1024]   # --prefill-seqs 0 skips the prefill part
        [--mixed-decodes 192]                   # 0 (default) skips the mixed step

Writes $OUT/llm_steps.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sampler import time_ms  # noqa: E402
from benchmarks.bench_text_throughput import (  # noqa: E402
    add_gemv_argument,
    batch1_ms_per_token,
    ceilings,
    gemv_option,
)
from benchmarks.model_configs import CONFIGS, num_params, write_config_dir  # noqa: E402
from benchmarks.profile_w1 import kernel_kind  # noqa: E402


@torch.inference_mode()  # the graph buffers are inference tensors
def fill_graph_inputs(runner, b: int, ctx: int, gen: torch.Generator) -> None:
    g = runner.graphs
    if b not in g.graphs:
        raise SystemExit(f"--batches: B={b} has no decode graph; captured sizes: {g.sizes}")
    bs = runner.block_size
    nb = -(-ctx // bs)
    if b * nb >= runner.num_kv_blocks:
        raise ValueError(
            f"B={b} x ctx={ctx} needs {b * nb} KV blocks, the pool has {runner.num_kv_blocks}"
        )
    dev = runner.device
    blocks = (torch.randperm(runner.num_kv_blocks - 1, generator=gen)[: b * nb] + 1).view(b, nb)
    tables = blocks.to(dev, torch.int32)
    g.block_tables[:b].zero_()
    g.block_tables[:b, :nb].copy_(tables)
    g.seq_lens[:b].fill_(ctx)
    g.query_start_loc[: b + 1].copy_(torch.arange(b + 1, dtype=torch.int32))
    g.positions[..., :b].fill_(ctx - 1)
    g.input_ids[:b].copy_(torch.randint(100, 10000, (b,), generator=gen))
    last = (ctx - 1) // bs
    g.slot_mapping[:b].copy_(tables[:, last].long() * bs + (ctx - 1) % bs)


def kernels_of(fn, replays: int = 5) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms per call, launches per call), largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # without a GPU (the CPU test): no kernels to list

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(replays):
            fn()
        sync()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0) or 0
        if t > 0:
            rows.append((ev.key, t / 1e3 / replays, round(ev.count / replays)))
    return sorted(rows, key=lambda r: -r[1])


def profile_batch(runner, model, b: int, args, gen, read_bps: float, cfg: dict):
    """(summary row, detail lines) of the decode graph for batch b."""
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv_heads, head = cfg["num_key_value_heads"], h // cfg["num_attention_heads"]
    head_bytes = 2 * v * h
    graph_weight_bytes = 2 * num_params(cfg) - head_bytes  # the embedding lookup reads B rows
    lines: list[str] = []
    details: list[str] = []
    fill_graph_inputs(runner, b, args.ctx, gen)
    graph = runner.graphs.graphs[b]
    out = runner.graphs.outputs[b]
    graph.replay()
    ms = time_ms(graph.replay, runner.device, 30)
    kv_bytes = b * args.ctx * n_layers * 2 * kv_heads * head * 2
    floor = (graph_weight_bytes + kv_bytes) / read_bps * 1e3
    head_ms = time_ms(
        lambda out=out, b=b, m=model: m.compute_logits(out[:b]).argmax(-1), runner.device, 30
    )
    head_floor = head_bytes / read_bps * 1e3
    kernels = kernels_of(graph.replay)
    by_kind: dict[str, float] = defaultdict(float)
    count = 0
    for name, kms, n in kernels:
        by_kind[kernel_kind(name)] += kms
        count += n
    lines.append(
        f"| {b} | {args.ctx} | {ms:.3f} | {floor:.3f} | {ms / floor:.2f} "
        f"| {kv_bytes / read_bps * 1e3:.3f} | {head_ms:.3f} | {head_floor:.3f} | {count} |"
    )
    print(lines[-1], flush=True)
    busy = sum(by_kind.values())
    details += [
        "",
        f"### B={b}: kernel time per replay {busy:.3f} ms of {ms:.3f} ms graph time "
        f"({count} kernels; the rest is gaps between kernels)",
        "",
        "| kind | ms | share |",
        "|---|---|---|",
    ]
    details += [
        f"| {k} | {t:.3f} | {100 * t / busy:.0f}% |"
        for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])
    ]
    # Host cost of launching the graph (the engine pays it every decode step), with the
    # GPU idle and with the GPU still busy with earlier replays.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    launch_idle_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    t0 = time.perf_counter()
    graph.replay()
    launch_busy_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    details += [
        "",
        f"Host time of one `graph.replay()`: {launch_idle_ms:.3f} ms with the GPU idle, "
        f"{launch_busy_ms:.3f} ms behind 3 queued replays.",
    ]
    shown = kernels if b == min(args.batches) else kernels[:10]
    details += ["", "| kernel | ms | launches |", "|---|---|---|"]
    details += [f"| `{name[:90]}` | {kms:.4f} | {n} |" for name, kms, n in shown]
    return lines, details


def profile_prefill(llm, cfg: dict, args, matmul_rate: float) -> tuple[list[str], dict[str, float]]:
    """Kernel time by kind of one prefill step of fresh prompts, against matmul floors;
    (report lines, GPU ms per step by kernel kind)."""
    from mmengine import SamplingParams

    h, n_layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, head = cfg["num_attention_heads"], h // cfg["num_attention_heads"]
    n, s = args.prefill_seqs, args.prefill_len
    gen = torch.Generator().manual_seed(1)

    def one_step() -> None:  # fresh random prompts: no prefix-cache hits
        ids = torch.randint(1000, 100000, (n, s), generator=gen).tolist()
        reqs = [{"prompt_token_ids": p} for p in ids]
        llm.generate(reqs, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)

    one_step()  # compiles this shape's kernels
    replays = 3
    kernels = kernels_of(one_step, replays)
    by_kind: dict[str, float] = defaultdict(float)
    for name, kms, _ in kernels:
        by_kind[kernel_kind(name)] += kms
    tokens = n * s
    gemm_flops = 2 * (num_params(cfg) - vocab * h) * tokens + 2 * vocab * h * n
    attn_flops = 2 * 2 * n * (s * s / 2) * head * heads * n_layers  # causal QK^T and PV
    floors = {"GEMM (cuBLAS)": gemm_flops, "paged attention (Triton)": attn_flops}
    busy = sum(by_kind.values())
    lines = [
        "",
        f"## Prefill step: {n} prompts x {s} tokens ({tokens} tokens), max_tokens=1",
        "",
        f"Kernel time per step {busy:.2f} ms; matmul floor of its GEMMs + attention "
        f"{(gemm_flops + attn_flops) / matmul_rate * 1e3:.2f} ms at the measured "
        f"{matmul_rate / 1e12:.0f} TFLOP/s.",
        "",
        "| kind | ms | share | FLOP floor ms | x floor |",
        "|---|---|---|---|---|",
    ]
    for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        f = floors.get(k)
        floor = f"{f / matmul_rate * 1e3:.2f} | {t / (f / matmul_rate * 1e3):.2f}" if f else "- | -"
        lines.append(f"| {k} | {t:.2f} | {100 * t / busy:.0f}% | {floor} |")
    lines += ["", "| kernel | ms per step | launches |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {kms:.3f} | {c} |" for name, kms, c in kernels[:15]]
    print("\n".join(lines), flush=True)
    return lines, dict(by_kind)


def mixed_steps(
    llm, decodes: int, ctx: int, prompts: int, prompt_len: int, steps: int, seed: int = 2
) -> tuple[list[tuple[int, int]], list[tuple[str, float, int]], float]:
    """Runs `steps` engine steps that each take `prompts` fresh prompts of `prompt_len`
    tokens while `decodes` requests decode, as the text benchmark's steps do once its first
    requests have their first tokens. Returns each profiled step's (decode rows, prompt
    tokens), its kernels (name, GPU ms per step, launches per step) and its host-to-host
    ms per step. Needs an in-process LLM (multiprocess=False); leaves no request behind."""
    from mmengine import SamplingParams
    from mmengine.messages import EngineCoreRequest, params_to_msg

    core = llm._client.core
    gen = torch.Generator().manual_seed(seed)
    vocab = core.spec.vocab_size

    def add(prefix: str, n: int, length: int, max_tokens: int) -> list[str]:
        msg = params_to_msg(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        ids = [f"{prefix}{i}" for i in range(n)]
        for rid in ids:
            prompt = torch.randint(1000, vocab, (length,), generator=gen).tolist()
            err = core.add_request(EngineCoreRequest(rid, prompt, msg))
            if err is not None:
                raise ValueError(f"request {rid} refused: {err.error}")
        return ids

    # The decoding requests: prefill them, then step until each has produced a token.
    decode_ids = add("dec", decodes, max(1, ctx - 128), 10**6)
    started: set[str] = set()
    while len(started) < decodes:
        started.update(o.request_id for o in core.step() if o.new_token_ids)
    was_async = core.async_scheduling
    core.async_scheduling = False  # one step = one call: launch, wait, update
    core._finish_in_flight()
    seen: list[tuple[int, int]] = []
    execute = core.runner.execute

    def recording_execute(sched):  # noqa: ANN001, ANN202
        rows = [s.num_tokens for s in sched.scheduled]
        seen.append((sum(1 for r in rows if r == 1), sum(r for r in rows if r > 1)))
        return execute(sched)

    core.runner.execute = recording_execute
    batch = [0]

    def one_step() -> None:
        add(f"p{batch[0]}-", prompts, prompt_len, 1)
        batch[0] += 1
        core.step()

    try:
        one_step()  # compiles what this step's shapes need
        seen.clear()
        t0 = time.perf_counter()
        kernels = kernels_of(one_step, steps)
        host_ms = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        core.runner.execute = execute
        core.async_scheduling = was_async
        core.abort_requests(decode_ids)
        while core.has_unfinished():
            core.step()
    return seen, kernels, host_ms


def profile_mixed(llm, args, prefill_by_kind: dict[str, float] | None) -> list[str]:
    """The mixed step's kernel time by kind, beside the prefill-only step's."""
    d = args.mixed_decodes
    steps = 3
    seen, kernels, host_ms = mixed_steps(
        llm, d, args.ctx, args.prefill_seqs, args.prefill_len, steps
    )
    by_kind: dict[str, float] = defaultdict(float)
    for name, kms, _ in kernels:
        by_kind[kernel_kind(name)] += kms
    busy = sum(by_kind.values())
    rows = ", ".join(f"{a} decodes + {b} prompt tokens" for a, b in seen)
    base = prefill_by_kind or {}
    lines = [
        "",
        f"## Mixed step: {d} decodes (context ~{args.ctx}) riding along prompt chunks",
        "",
        f"Profiled steps: {rows}. Kernel time per step {busy:.2f} ms; host to host "
        f"{host_ms:.2f} ms per step (synchronous steps, profiler on). The prefill-only column "
        f"is the step of {args.prefill_seqs} x {args.prefill_len} prompt tokens above.",
        "",
        "| kind | mixed ms | prefill-only ms | difference ms |",
        "|---|---|---|---|",
    ]
    for k in sorted(set(by_kind) | set(base), key=lambda k: -by_kind.get(k, 0.0)):
        m, p = by_kind.get(k, 0.0), base.get(k, 0.0)
        lines.append(f"| {k} | {m:.2f} | {p:.2f} | {m - p:+.2f} |")
    lines += ["", "| kernel | ms per step | launches |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {kms:.3f} | {c} |" for name, kms, c in kernels[:15]]
    print("\n".join(lines), flush=True)
    return lines


def profile_engine(
    cfg_dir: Path, cfg: dict, args, read_bps: float, matmul_rate: float
) -> list[str]:
    from mmengine import LLM

    t0 = time.perf_counter()
    llm = LLM(
        str(cfg_dir),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        multiprocess=False,
        max_model_len=args.ctx + 192,
        max_num_seqs=max(*args.batches, args.mixed_decodes + args.prefill_seqs),
        max_num_batched_tokens=max(8192, args.prefill_seqs * args.prefill_len),
        extra={"load_format": "dummy", **gemv_option(args)},
    )
    startup = time.perf_counter() - t0
    runner = llm._client.core.runner
    model = runner.model
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv_heads, head = cfg["num_key_value_heads"], h // cfg["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"## Decode steps (engine start-up {startup:.0f} s, {runner.num_kv_blocks} KV blocks)",
        "",
        "| B | ctx | graph GPU ms | floor ms (weights + KV) | x floor | of which KV floor ms "
        "| LM head + argmax ms | its floor ms | kernels per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for b in args.batches:
        with torch.inference_mode():  # the graphs' buffers are inference tensors
            lines_b, details_b = profile_batch(runner, model, b, args, gen, read_bps, cfg)
        lines += lines_b
        details += details_b
    prompt = list(range(1000, 1000 + args.ctx - 129))
    b1 = batch1_ms_per_token(llm, prompt)
    b1_floor = (
        (2 * num_params(cfg) + (args.ctx - 64) * n_layers * 2 * kv_heads * head * 2)
        / read_bps
        * 1e3
    )
    lines += [
        "",
        f"Engine per-token time at batch 1 (in-process, context {len(prompt)}..{len(prompt) + 128}): "
        f"**{b1:.3f} ms**, floor {b1_floor:.3f} ms (all weights incl. LM head + KV) -> "
        f"{b1 / b1_floor:.2f}x.",
    ]
    print(lines[-1], flush=True)
    prefill_by_kind = None
    if args.prefill_seqs > 0:
        prefill_lines, prefill_by_kind = profile_prefill(llm, cfg, args, matmul_rate)
        details += prefill_lines
    if args.mixed_decodes > 0:
        details += profile_mixed(llm, args, prefill_by_kind)
    llm.shutdown()
    llm = runner = model = None
    gc.collect()
    torch.cuda.empty_cache()
    return lines + details


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="qwen2.5-3b", choices=sorted(CONFIGS))
    ap.add_argument(
        "--batches", default="1,16,64,192", type=lambda s: [int(x) for x in s.split(",")]
    )
    ap.add_argument("--ctx", type=int, default=1152, help="KV positions per sequence")
    ap.add_argument("--prefill-seqs", type=int, default=8, help="prompts in the prefill step")
    ap.add_argument("--prefill-len", type=int, default=1024, help="tokens per prompt")
    ap.add_argument(
        "--mixed-decodes",
        type=int,
        default=0,
        help="decoding requests riding along the profiled mixed step (0: no mixed step)",
    )
    add_gemv_argument(ap)
    ap.add_argument("--out-name", default="llm_steps.md", help="file written under $OUT")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    ceil = ceilings()
    read_bps, matmul_rate = ceil["read_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    card = torch.cuda.get_device_name(0)
    lines = [
        f"# LLM steps on {card}: {args.config}, random bf16 weights, "
        f"gemv_max_tokens={args.gemv_max_tokens if args.gemv_max_tokens is not None else 'default'}",
        "",
        f"Read bandwidth (sum of 1 GiB bf16): {read_bps / 1e9:.0f} GB/s; bf16 matmul "
        f"{matmul_rate / 1e12:.0f} TFLOP/s. Weights "
        f"{2 * num_params(cfg) / 1e9:.2f} GB (LM head tied to the embedding, counted once).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = write_config_dir(args.config, Path(tmp) / "model")
        lines += profile_engine(cfg_dir, cfg, args, read_bps, matmul_rate)
    text = "\n".join(lines) + "\n"
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / args.out_name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
