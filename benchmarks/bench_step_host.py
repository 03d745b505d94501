"""Host time to launch a prefill step against the step's time on the GPU (issue 3).

A decode step replays a CUDA graph, and so does a step with prompt chunks of up to
`mixed_graph_max_tokens` tokens (default 1024); a larger one launches the compiled
decoder layers from Python. If a launch takes longer than the GPU needs for the step's
kernels, the GPU waits on the host: the step costs its host time, not its kernel time. This script measures both, per step size, on the Qwen2.5-3B text config
(random bf16 weights, in-process engine, synchronous steps):

  - launch ms: host time of `ModelRunner.execute` (prepare + forward + sampling launches),
    started with the GPU idle;
  - step ms: launch start to the sampled tokens on the host (the GPU's end);
  - GPU ms: CUDA events around the launch (covers GPU idle inside the step while the host
    still launches it, so it is >= the kernels' busy time).

A step is host-bound when launch ms is close to step ms. Each variant (`--variant
NAME[:KEY=VALUE,...]`, engine `extra` options or `enforce_eager=1`) is one run of this
script (an engine's GPU memory is not all returned within a process); `--cprofile` adds
where the host time goes (cProfile, top functions) for the `--cprofile-tokens` step.

    for v in base nomixed:mixed_graph_max_tokens=0 nonormop:mixed_graph_max_tokens=0,norm_triton_op=0; do
        python3 benchmarks/bench_step_host.py --variant $v [--tokens 256,1024,2048,8192] [--cprofile]
    done

Writes $OUT/step_host_NAME.md (and .json).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.model_configs import CONFIGS, write_config_dir  # noqa: E402
from benchmarks.report import write_report  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, int]]:
    """`name` or `name:key=value,key=value` -> (name, options)."""
    name, _, rest = text.partition(":")
    opts: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: expected KEY=VALUE, got {item!r}")
        opts[key] = int(value)
    return name, opts


def step_shapes(tokens: int, prompt_len: int) -> tuple[int, int]:
    """(prompts, tokens each) of a prefill step of `tokens` tokens: whole prompts of
    `prompt_len` when it divides, else one prompt of `tokens`."""
    if tokens > prompt_len and tokens % prompt_len == 0:
        return tokens // prompt_len, prompt_len
    return 1, tokens


class StepTimer:
    """Wraps a runner's `execute`: each call starts with the GPU idle, and records the
    host launch time, the launch-to-result time and the GPU time between events."""

    def __init__(self, runner) -> None:  # noqa: ANN001
        self.runner = runner
        self.execute = runner.execute
        self.rows: list[tuple[float, float, float]] = []
        self.profiler: cProfile.Profile | None = None

    def __call__(self, sched):  # noqa: ANN001, ANN204
        cuda = self.runner.device.type == "cuda"  # (the CPU test runs it without events)
        if cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
        pending = self.execute(sched)
        if self.profiler is not None:
            self.profiler.disable()
        t1 = time.perf_counter()
        if cuda:
            end.record()
        pending.result()
        t2 = time.perf_counter()
        gpu_ms = float("nan")
        if cuda:
            torch.cuda.synchronize()
            gpu_ms = start.elapsed_time(end)
        self.rows.append(((t1 - t0) * 1e3, (t2 - t0) * 1e3, gpu_ms))
        return pending  # its result() is fetched already and returns the same output


def time_steps(
    llm,  # noqa: ANN001
    n_prompts: int,
    length: int,
    repeats: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
) -> StepTimer:
    """`repeats` engine steps of `n_prompts` fresh prompts of `length` tokens (max_tokens 1),
    after one warm-up step; returns the timer holding the timed steps. `profiler`: also
    profile the timed steps' launches."""
    from mmengine import SamplingParams
    from mmengine.messages import EngineCoreRequest, params_to_msg

    core = llm._client.core
    gen = torch.Generator().manual_seed(seed)
    msg = params_to_msg(SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    timer = StepTimer(core.runner)
    core.runner.execute = timer
    was_async = core.async_scheduling
    core.async_scheduling = False
    try:
        for r in range(repeats + 1):
            for i in range(n_prompts):
                prompt = torch.randint(1000, core.spec.vocab_size, (length,), generator=gen)
                err = core.add_request(EngineCoreRequest(f"s{seed}-{r}-{i}", prompt.tolist(), msg))
                if err is not None:
                    raise ValueError(f"request refused: {err.error}")
            while core.has_unfinished():
                core.step()
            if r == 0:
                timer.rows.clear()  # the warm-up step
                timer.profiler = profiler
    finally:
        core.runner.execute = timer.execute
        core.async_scheduling = was_async
    return timer


def bench_variant(cfg_dir: Path, name: str, opts: dict[str, int], args) -> tuple[list[dict], str]:  # noqa: ANN001
    from mmengine import LLM

    opts = dict(opts)
    eager = bool(opts.pop("enforce_eager", 0))
    t0 = time.perf_counter()
    llm = LLM(
        str(cfg_dir),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        multiprocess=False,
        enforce_eager=eager,
        max_model_len=max(args.tokens) + 64,
        max_num_batched_tokens=max(args.tokens),
        extra={"load_format": "dummy", **opts},
    )
    startup = time.perf_counter() - t0
    rows, prof_text = [], ""
    for k, tokens in enumerate(args.tokens):
        n, length = step_shapes(tokens, args.prompt_len)
        timer = time_steps(llm, n, length, args.repeats, seed=100 * k + 1)
        launch, step, gpu = (statistics.median(c) for c in zip(*timer.rows, strict=True))
        rows.append(
            {
                "variant": name,
                "tokens": tokens,
                "prompts": n,
                "launch_ms": launch,
                "step_ms": step,
                "gpu_ms": gpu,
                "startup_s": startup,
            }
        )
        print(rows[-1], flush=True)
        if args.cprofile and tokens == args.cprofile_tokens and not prof_text:
            prof = cProfile.Profile()
            time_steps(llm, n, length, 3, seed=999, profiler=prof)
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumulative").print_stats(40)
            prof_text = buf.getvalue()
        if args.torch_ops and tokens == args.cprofile_tokens:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
                time_steps(llm, n, length, 3, seed=998)
            prof_text += "\n" + tp.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return rows, prof_text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="qwen2.5-3b", choices=sorted(CONFIGS))
    ap.add_argument(
        "--tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[256, 1024, 2048, 8192],
        help="prefill tokens per step (comma list)",
    )
    ap.add_argument("--prompt-len", type=int, default=1024, help="tokens per prompt in a step")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per size")
    ap.add_argument(
        "--variant",
        default="base",
        help="NAME[:KEY=VALUE,...]: engine extra options (or enforce_eager=1) (default: base)",
    )
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the launches")
    ap.add_argument(
        "--torch-ops",
        action="store_true",
        help="also torch.profiler's CPU time per op (key_averages) of the launches",
    )
    ap.add_argument(
        "--cprofile-tokens",
        type=int,
        default=2048,
        help="the step size --cprofile/--torch-ops profile",
    )
    args = ap.parse_args(argv)
    name, opts = parse_variant(args.variant)
    card = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = write_config_dir(args.config, Path(tmp) / args.config)
        rows, prof = bench_variant(cfg_dir, name, opts, args)
    lines = [
        f"# Prefill step: host launch vs GPU, {args.config} (random bf16 weights), {card}",
        "",
        "Median of the timed steps, ms. launch: host time of ModelRunner.execute with the GPU "
        "idle at its start; step: launch start to sampled tokens on the host; GPU: events "
        "around the launch.",
        "",
        "| variant | tokens (prompts) | launch ms | step ms | GPU ms | launch / step | start-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['tokens']} ({r['prompts']}) | {r['launch_ms']:.2f} | "
            f"{r['step_ms']:.2f} | {r['gpu_ms']:.2f} | {r['launch_ms'] / r['step_ms']:.0%} | "
            f"{r['startup_s']:.0f} |"
        )
    if prof:
        lines += [
            "",
            f"## Host profile of the launches ({args.cprofile_tokens} tokens)",
            "",
            "```",
            prof,
            "```",
        ]
    write_report(f"step_host_{name}", "\n".join(lines), {"card": card, "rows": rows})


if __name__ == "__main__":
    main()
