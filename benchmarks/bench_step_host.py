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

Vision steps (`--images WxH,...`, a vision-language config such as `qwen2.5-vl-3b`): each
step is one prompt of a fresh random-noise image of that size (so the embedding and prefix
caches miss) and `--text-len` text tokens; the step runs the vision encoder and the
decoder over the expanded prompt. This times `mixed_graph_multimodal` (vision steps
replaying the mixed-step graphs) against steps launched from the host:

    for v in base mmgraphs:mixed_graph_multimodal=1; do
        python3 benchmarks/bench_step_host.py --config qwen2.5-vl-3b --images 224x224,448x448,896x504 --variant $v
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

from benchmarks.bench_mm_throughput import (  # noqa: E402
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    noise_image,
)
from benchmarks.model_configs import CONFIGS, write_config_dir  # noqa: E402
from benchmarks.report import write_report  # noqa: E402

VISION_TOKENS = (VISION_START, IMAGE_PAD, VISION_END)  # the published Qwen-VL configs' ids


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
        self.tokens: list[int] = []  # scheduled tokens of each recorded step
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
        self.tokens.append(sched.num_batched_tokens)
        return pending  # its result() is fetched already and returns the same output


def image_prompt_maker(
    llm,  # noqa: ANN001
    size: tuple[int, int],
    text_len: int,
    seed: int,
    image_token_ids: tuple[int, int, int] = VISION_TOKENS,
):  # noqa: ANN202 - (repeat, index) -> (token ids, processed media)
    """Prompts of one fresh random-noise image of `size` (w, h) and `text_len` random text
    tokens, through the engine's input workers (decode, preprocess, placeholder expansion),
    as `time_steps`' `make_prompt`. Every call draws new pixels: no cache hit."""
    import numpy as np

    # Text ids below the vision tokens: the special tokens (video placeholders among them)
    # sit above the ordinary vocabulary in the Qwen-VL tokenizers.
    high = min(llm._client.core.spec.vocab_size, *image_token_ids)
    w, h = size

    def make(r: int, i: int) -> tuple[list[int], object]:
        rng = np.random.default_rng([seed, r, i])
        image = noise_image(rng.integers(2**62), w, h)
        text = rng.integers(min(1000, high // 2), high, text_len).tolist()
        ids = [*image_token_ids, *text]
        ((_, _, fut),) = llm._process_media([(None, ids, ({"image": image}, None))])
        return llm._resolve_media(i, fut)

    return make


def time_steps(
    llm,  # noqa: ANN001
    n_prompts: int,
    length: int,
    repeats: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
    make_prompt=None,  # noqa: ANN001 - (repeat, index) -> (ids, processed media)
) -> StepTimer:
    """`repeats` engine steps of `n_prompts` fresh prompts of `length` tokens (max_tokens 1),
    after one warm-up step; returns the timer holding the timed steps. `profiler`: also
    profile the timed steps' launches. `make_prompt`: builds each prompt instead (e.g.
    `image_prompt_maker`; `length` is then unused); its media is processed before the
    step, outside the timed launch."""
    from mmengine import SamplingParams
    from mmengine.messages import core_requests

    core = llm._client.core
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    timer = StepTimer(core.runner)
    core.runner.execute = timer
    was_async = core.async_scheduling
    core.async_scheduling = False
    try:
        for r in range(repeats + 1):
            for i in range(n_prompts):
                if make_prompt is None:
                    ids = torch.randint(1000, core.spec.vocab_size, (length,), generator=gen)
                    ids, mm = ids.tolist(), None
                else:
                    ids, mm = make_prompt(r, i)
                (req,) = core_requests(ids, mm, params, [f"s{seed}-{r}-{i}"])
                err = core.add_request(req)
                if err is not None:
                    raise ValueError(f"request refused: {err.error}")
            while core.has_unfinished():
                core.step()
            if r == 0:
                timer.rows.clear()  # the warm-up step
                timer.tokens.clear()
                timer.profiler = profiler
    finally:
        core.runner.execute = timer.execute
        core.async_scheduling = was_async
    return timer


def bench_variant(cfg_dir: Path, name: str, opts: dict[str, int], args) -> tuple[list[dict], str]:  # noqa: ANN001
    from mmengine import LLM

    opts = dict(opts)
    eager = bool(opts.pop("enforce_eager", 0))
    budget = max(args.tokens) if not args.images else args.image_step_tokens
    t0 = time.perf_counter()
    llm = LLM(
        str(cfg_dir),
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        multiprocess=False,
        enforce_eager=eager,
        max_model_len=budget + 64,
        max_num_batched_tokens=budget,
        # A real checkpoint for vision steps: the vision tower has no dummy weights.
        extra=({} if args.images else {"load_format": "dummy"}) | opts,
    )
    startup = time.perf_counter() - t0
    rows, prof_text = [], ""
    shapes = args.images or args.tokens
    for k, shape in enumerate(shapes):
        make_prompt = None
        if args.images:
            n, length = 1, 0
            make_prompt = image_prompt_maker(llm, shape, args.text_len, seed=100 * k + 1)
        else:
            n, length = step_shapes(shape, args.prompt_len)
        timer = time_steps(llm, n, length, args.repeats, seed=100 * k + 1, make_prompt=make_prompt)
        launch, step, gpu = (statistics.median(c) for c in zip(*timer.rows, strict=True))
        rows.append(
            {
                "variant": name,
                "image": f"{shape[0]}x{shape[1]}" if args.images else None,
                "tokens": timer.tokens[-1],
                "prompts": n,
                "launch_ms": launch,
                "step_ms": step,
                "gpu_ms": gpu,
                "startup_s": startup,
            }
        )
        print(rows[-1], flush=True)
        tokens = shape if not args.images else None
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
    ap.add_argument(
        "--images",
        type=lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",")],
        default=None,
        help="vision steps instead of --tokens: image sizes WxH (comma list), one prompt of a "
        "fresh image and --text-len text tokens a step (needs a vision-language --config)",
    )
    ap.add_argument("--text-len", type=int, default=64, help="text tokens after each image")
    ap.add_argument(
        "--image-step-tokens",
        type=int,
        default=2048,
        help="with --images: the step token budget (an image's prompt must fit in one step)",
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="with --images: a checkpoint of --config from benchmarks/random_checkpoint.py "
        "(default: build one with random weights in a temporary folder)",
    )
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
    if args.images and "vision_config" not in CONFIGS[args.config]:
        ap.error(f"--images needs a vision-language --config; {args.config} has no vision tower")
    name, opts = parse_variant(args.variant)
    card = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        if args.images and args.model is not None:
            cfg_dir = args.model
        elif args.images:
            from benchmarks.random_checkpoint import build_random_checkpoint

            cfg_dir = build_random_checkpoint(
                CONFIGS[args.config], Path(tmp) / args.config, tokenizer=False
            )
        else:
            cfg_dir = write_config_dir(args.config, Path(tmp) / args.config)
        rows, prof = bench_variant(cfg_dir, name, opts, args)
    what = "Vision" if args.images else "Prefill"
    lines = [
        f"# {what} step: host launch vs GPU, {args.config} (random bf16 weights), {card}",
        "",
        "Median of the timed steps, ms. launch: host time of ModelRunner.execute with the GPU "
        "idle at its start; step: launch start to sampled tokens on the host; GPU: events "
        "around the launch.",
        "",
        "| variant | image | tokens (prompts) | launch ms | step ms | GPU ms | launch / step "
        "| start-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['image'] or '-'} | {r['tokens']} ({r['prompts']}) | "
            f"{r['launch_ms']:.2f} | "
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
