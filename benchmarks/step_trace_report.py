"""Summarizes an engine step trace (``MMENGINE_STEP_TRACE``, see mmengine/step_trace.py).

Answers "when did the GPU wait, and for what": GPU busy per tenth of the run (from the
CUDA events around each step's launches), the idle gaps between consecutive steps on the
GPU, and per kind of step (with encoder work / prefill / decode only) the mean GPU time
beside the mean host time of each phase. A step whose host work (schedule + launch +
update) is longer than the GPU time of the step before it leaves the GPU idle.

A step's GPU span runs from its start event to its end event, so it also counts GPU time
idle *inside* the step while the host is still launching it: a busy figure near 100% says the
stream always had a step in progress, not that kernels ran all the time. For kernel-level
busy time use a profile (`bench_mm_throughput.py --torch-profile`). What the trace does show
directly: the host phases per step, and when the host waited for the GPU (wait ms).

    python3 benchmarks/step_trace_report.py trace.jsonl [--top 10] [--steps FIRST:END]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kind_of(step: dict) -> str:
    if step["encoder_items"]:
        return "encoder+llm"
    if step["prefill_tokens"]:
        return "prefill(+decode)"
    return "decode only"


def report(steps: list[dict], top: int = 10, tenths: int = 10) -> list[str]:
    """Markdown lines. Steps without GPU times (a CPU run) give host phases only."""
    lines: list[str] = []
    if not steps:
        return ["(empty trace)"]
    timed = [s for s in steps if s.get("gpu_start_s") is not None]
    gaps = [0.0] + [max(0.0, b["gpu_start_s"] - a["gpu_end_s"]) for a, b in zip(timed, timed[1:])]
    if timed:
        span = timed[-1]["gpu_end_s"] - timed[0]["gpu_start_s"]
        busy = sum(s["gpu_end_s"] - s["gpu_start_s"] for s in timed)
        lines.append(
            f"{len(steps)} steps; GPU span {span:.3f} s, inside steps {busy:.3f} s "
            f"({100 * busy / max(span, 1e-9):.0f}%), idle between steps {sum(gaps):.3f} s"
        )
        # Busy fraction per equal slice of the GPU span.
        edges = [timed[0]["gpu_start_s"] + span * i / tenths for i in range(tenths + 1)]
        per = [0.0] * tenths
        for s in timed:
            a, b = s["gpu_start_s"], s["gpu_end_s"]
            for i in range(tenths):
                lo, hi = max(a, edges[i]), min(b, edges[i + 1])
                if hi > lo:
                    per[i] += hi - lo
        width = span / tenths if span > 0 else 1.0
        lines.append(
            "GPU inside a step per tenth: " + " ".join(f"{100 * p / width:.0f}%" for p in per)
        )
    lines += [
        "",
        "| kind of step | steps | GPU span ms | idle before ms (sum s) | schedule ms | launch ms | "
        "wait ms | update ms | rows | prefill tok | enc items |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    gap_of = {id(s): g for s, g in zip(timed, gaps)}
    for s in steps:
        by[kind_of(s)].append((s, gap_of.get(id(s), 0.0)))
    for kind in ("encoder+llm", "prefill(+decode)", "decode only"):
        rows = by.get(kind)
        if not rows:
            continue
        n = len(rows)

        def mean_ms(key: str, rows=rows, n=n) -> float:
            return 1e3 * sum(r[0][key] for r in rows) / n

        gpu = [
            (r[0]["gpu_end_s"] - r[0]["gpu_start_s"])
            for r in rows
            if r[0].get("gpu_start_s") is not None
        ]
        gsum = sum(r[1] for r in rows)
        lines.append(
            f"| {kind} | {n} | {1e3 * sum(gpu) / max(len(gpu), 1):.2f} | "
            f"{1e3 * gsum / n:.2f} ({gsum:.3f}) | {mean_ms('schedule_s'):.2f} | "
            f"{mean_ms('launch_s'):.2f} | {mean_ms('wait_s'):.2f} | {mean_ms('update_s'):.2f} | "
            f"{sum(r[0]['decode_rows'] for r in rows) / n:.0f} | "
            f"{sum(r[0]['prefill_tokens'] for r in rows) / n:.0f} | "
            f"{sum(r[0]['encoder_items'] for r in rows) / n:.1f} |"
        )
    if timed and top:
        lines += [
            "",
            f"Longest {top} GPU idle gaps (before the step named):",
            "",
            "| GPU t s | gap ms | kind | schedule ms | launch ms | prev update ms | rows | "
            "prefill tok | enc items (tokens) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(range(len(timed)), key=lambda i: -gaps[i])[:top]
        for i in sorted(order):
            s = timed[i]
            prev_update = timed[i - 1]["update_s"] if i else 0.0
            lines.append(
                f"| {s['gpu_start_s']:.3f} | {1e3 * gaps[i]:.1f} | {kind_of(s)} | "
                f"{1e3 * s['schedule_s']:.2f} | {1e3 * s['launch_s']:.2f} | "
                f"{1e3 * prev_update:.2f} | {s['decode_rows']} | {s['prefill_tokens']} | "
                f"{s['encoder_items']} ({s['encoder_tokens']}) |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument(
        "--steps",
        default=":",
        help="FIRST:END, the steps to report (e.g. skip a warm-up: the engine's stats() "
        "num_steps before and after the run)",
    )
    args = ap.parse_args()
    a, _, b = args.steps.partition(":")
    steps = load(args.trace)[int(a) if a else None : int(b) if b else None]
    print("\n".join(report(steps, args.top)))


if __name__ == "__main__":
    main()
