"""W2 online (../shared/BENCHMARKS.md): W1-shaped chat requests sent to an OpenAI-compatible
server at Poisson arrival rates, streamed; reports TTFT, TPOT, ITL and E2E (mean, p50,
p99), throughput and failed requests, one table row per rate.

Each request: one random-noise RGB image as a PNG data URL (half 256x256, half 1280x720,
as W1), then a user text of random words, then `--output-len` generated tokens
(`ignore_eos`, greedy). TPOT = (E2E - TTFT) / (output tokens - 1); ITL = the gaps between
streamed chunks.

By default it starts `mmengine serve` on the given model (the embedded default model when
none is given) and stops it at the end; `--url` measures a server that is already running
(mmengine or any OpenAI-compatible peer that accepts `ignore_eos`).

    python3 benchmarks/bench_serving.py [MODEL] [--rates 1,4,8,16,inf] [--num-requests 200]
        [--serve-args "--max-num-seqs 256"] [--url http://host:port]

Writes $OUT/serving.md and serving.json (OUT defaults to the current folder).

On a GPU, at the published Qwen2.5-VL-3B shape (random weights, the embedded model's
tokenizer; no hub needed):

    python3 benchmarks/random_checkpoint.py /tmp/vl3b
    python3 benchmarks/bench_serving.py /tmp/vl3b --text-len 80

(that tokenizer spends ~3.2 tokens per word: 80 words are W1's ~256 text tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

# Common English words: the random user text (about one token each for BPE tokenizers).
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "they",
    "this",
    "are",
    "be",
    "have",
    "not",
    "but",
    "had",
    "one",
    "were",
    "all",
    "which",
    "she",
    "there",
    "their",
    "been",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "first",
    "any",
    "like",
    "now",
    "my",
    "such",
    "make",
    "over",
    "our",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds from sending to the first content chunk
    e2e: float = 0.0  # seconds from sending to the last chunk
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between content chunks
    error: str = ""


def noise_png_data_url(seed: int, width: int, height: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_requests(n: int, text_len: int, sizes: list[tuple[int, int]], seed: int) -> list[list]:
    """The chat `messages` of each request (images alternate between the sizes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        text = " ".join(rng.choice(WORDS, text_len).tolist())
        content = [
            {
                "type": "image_url",
                "image_url": {"url": noise_png_data_url(seed * 100_003 + i, w, h)},
            },
            {"type": "text", "text": text},
        ]
        out.append([{"role": "user", "content": content}])
    return out


async def one_request(client, url: str, model: str, messages: list, output_len: int) -> Result:  # noqa: ANN001
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = done = None
    itls: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return Result(
                    False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                )
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = time.perf_counter()
                    continue
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                choices = chunk.get("choices") or []
                if not choices or not choices[0].get("delta", {}).get("content"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
    except Exception as e:  # a failed request is counted, not fatal
        return Result(False, error=f"{type(e).__name__}: {e}"[:200])
    if first is None:
        # Tokens whose text is empty (special or partial characters) stream no content:
        # a completed stream still counts, with its first byte at the end.
        if done is None or tokens == 0:
            return Result(False, error="the stream ended without content or [DONE]")
        first = last = done
    return Result(True, first - t0, last - t0, tokens, itls)


async def run_rate(
    url: str, model: str, reqs: list, rate: float, output_len: int, seed: int
) -> tuple[list[Result], float]:
    """Sends every request, spaced by exponential gaps of mean 1/rate (all at once for inf)."""
    import httpx

    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        for messages in reqs:
            tasks.append(asyncio.create_task(one_request(client, url, model, messages, output_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def summarize(results: list[Result], wall: float, rate: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
        a = np.asarray(values) * 1e3
        return {
            "mean": float(a.mean()),
            "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)),
        }

    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "rate": rate,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "output_tok_per_s": out_tokens / wall,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats(tpot),
        "itl_ms": stats([g for r in ok for g in r.itls]),
        "e2e_ms": stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str | None, serve_args: str, timeout_s: float
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "mmengine.cli", "serve"]
    if model:
        cmd.append(model)
    cmd += ["--host", "127.0.0.1", "--port", str(port), *shlex.split(serve_args)]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the server did not become healthy within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def table(rows: list[dict]) -> str:
    lines = [
        "| rate (req/s) | requests | failed | req/s | output tok/s | TTFT mean / p50 / p99 ms "
        "| TPOT mean / p50 / p99 ms | ITL mean / p50 / p99 ms | E2E mean / p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            "/".join(
                f"{r[k][s]:.0f}" if k != "itl_ms" and k != "tpot_ms" else f"{r[k][s]:.1f}"
                for s in ("mean", "p50", "p99")
            )
            for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
        ]
        lines.append(
            f"| {r['rate']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} "
            f"| {r['output_tok_per_s']:.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "model", nargs="?", default=None, help="checkpoint to serve (default: the embedded model)"
    )
    ap.add_argument(
        "--url", default=None, help="measure this running server instead of starting one"
    )
    ap.add_argument("--serve-args", default="", help="extra flags for `mmengine serve`")
    ap.add_argument("--rates", default="1,4,8,16,inf", help="Poisson arrival rates, req/s")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--text-len", type=int, default=256, help="words of user text")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--image-sizes", default="256x256,1280x720")
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    args = ap.parse_args()

    import httpx

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.image_sizes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.serve_args, args.startup_timeout)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        warm = make_requests(args.warmup_requests, 16, sizes, seed=args.seed + 7)
        asyncio.run(run_rate(url, model, warm, math.inf, 4, args.seed))
        rows = []
        for i, rate in enumerate(rates):
            reqs = make_requests(
                args.num_requests, args.text_len, sizes, seed=args.seed + 1000 * (i + 1)
            )
            results, wall = asyncio.run(
                run_rate(url, model, reqs, rate, args.output_len, args.seed + i)
            )
            rows.append(summarize(results, wall, rate))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    text = (
        f"### W2 online — {model} at {url if args.url else 'a local mmengine server'}\n\n"
        f"{args.num_requests} requests per rate: one noise image ({args.image_sizes}) + "
        f"{args.text_len} words, {args.output_len} output tokens (ignore_eos, greedy), "
        "streamed chat completions.\n\n" + table(rows)
    )
    write_report("serving", text, rows)


if __name__ == "__main__":
    main()
