"""Where a process's host time goes, from py-spy's raw (collapsed-stack) samples.

`py-spy record --format raw` writes one line per distinct stack: frames joined by ';',
outermost first, then the sample count. This reports, for the project's own code
(mmengine/, mmkernels/, encoders/, processors/), the share of samples
  - inclusive: stacks that pass through the function (its time and its callees');
  - innermost: stacks whose innermost project frame is it (time in it, or in library code
    it called directly: torch ops, CUDA launches, ZMQ), by function and line.
Samples taken while the thread idles (py-spy --idle) count too, so a loop that waits for
the GPU shows its wait.

    python3 benchmarks/pyspy_summary.py samples.txt [--top 30] [--only serve]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

PROJECT_DIRS = ("mmengine/", "mmkernels/", "encoders/", "processors/")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def parse(path: str | Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def _project_frame(frame: str) -> tuple[str, str] | None:
    """(function with its file, its line) when the frame is the project's code."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return None
    file = m.group("file")
    for d in PROJECT_DIRS:
        i = file.find(d)
        if i >= 0 and "site-packages" not in file:
            short = file[i:]
            return f"{m.group('func')} ({short})", f"{short}:{m.group('line') or '?'}"
    return None


def summarize(stacks: list[tuple[list[str], int]], top: int = 30, only: str | None = None):
    """Markdown lines. `only`: keep the stacks with a frame containing this text (e.g.
    "serve (" for the engine-core loop's thread)."""
    if only:
        stacks = [(s, n) for s, n in stacks if any(only in f for f in s)]
    total = sum(n for _, n in stacks)
    inclusive: Counter = Counter()
    innermost: Counter = Counter()
    for frames, n in stacks:
        seen = set()
        inner = None
        for f in frames:
            pf = _project_frame(f)
            if pf is None:
                continue
            if pf[0] not in seen:
                inclusive[pf[0]] += n
                seen.add(pf[0])
            inner = pf
        innermost[
            f"{inner[0]} line {inner[1].rsplit(':', 1)[1]}" if inner else "(no project frame)"
        ] += n
    lines = [f"{total} samples", "", "| inclusive % | function |", "|---|---|"]
    for name, n in inclusive.most_common(top):
        lines.append(f"| {100 * n / max(total, 1):.1f} | `{name}` |")
    lines += ["", "| innermost % | function, line |", "|---|---|"]
    for name, n in innermost.most_common(top):
        lines.append(f"| {100 * n / max(total, 1):.1f} | `{name}` |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("samples", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--only", default=None, help="only stacks with a frame containing this")
    args = ap.parse_args()
    print("\n".join(summarize(parse(args.samples), args.top, args.only)))


if __name__ == "__main__":
    main()
