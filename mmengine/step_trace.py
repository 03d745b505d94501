"""Per-step timeline of the engine core, for finding where the GPU waits (off by default).

Set ``MMENGINE_STEP_TRACE=/path/trace.jsonl`` and the engine core (in-process or its own
process) records for every step: when its planning began, the host time of each phase
(schedule, launch = encoder + prepare + forward + sample launches, wait = blocking on the
previous step's tokens, update), what it ran (decode rows, prefill tokens, encoder items and
their embedding rows), and two CUDA events around its launches. The file is written when the engine
shuts down: one JSON line per step, with the GPU start and end of each step read from the
events then (so recording costs no host-GPU synchronization while serving).

``benchmarks/step_trace_report.py`` turns the file into a table: per kind of step the host
phases beside the GPU span, the gaps between steps on the GPU, and when the host waited. A
step's GPU span also holds GPU idle time inside the step while the host still launches it;
kernel-level busy time needs a profile (`LLM.start_profile`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV = "MMENGINE_STEP_TRACE"


@dataclass
class StepRecord:
    t: float  # seconds since the trace began: the step's planning started
    schedule_s: float = 0.0
    launch_s: float = 0.0  # encoder + prepare + forward + sampling launches
    wait_s: float = 0.0  # blocked on the previous step's tokens (host idle, GPU busy)
    update_s: float = 0.0
    decode_rows: int = 0
    prefill_tokens: int = 0
    encoder_items: int = 0
    encoder_tokens: int = 0  # their embedding rows
    gpu_start_s: float | None = None  # GPU timeline, seconds since the first step's start
    gpu_end_s: float | None = None
    events: Any = field(default=None, repr=False)  # (start, end) CUDA events until dumped


class StepTrace:
    """Collects `StepRecord`s; `dump()` resolves the CUDA events and writes JSON lines."""

    MAX_STEPS = 200_000  # a debugging aid: bounded memory (and CUDA events) in a long run

    def __init__(self, path: str, device: torch.device) -> None:
        self.path = path
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.steps: list[StepRecord] = []
        self._written = False

    @staticmethod
    def from_env(device: torch.device) -> StepTrace | None:
        path = os.environ.get(ENV, "")
        return StepTrace(path, device) if path else None

    def begin(self, t_start: float, schedule_s: float, sched: Any) -> StepRecord | None:  # noqa: ANN401
        """A record of the step about to launch (None once MAX_STEPS are recorded)."""
        if len(self.steps) >= self.MAX_STEPS:
            if len(self.steps) == self.MAX_STEPS:
                logger.warning("step trace: %d steps recorded, no more", self.MAX_STEPS)
                self.steps.append(StepRecord(t=-1.0))  # marks the warning as given
            return None
        rec = StepRecord(t=t_start - self.t0, schedule_s=schedule_s)
        for s in sched.scheduled:
            if s.num_tokens == 1 and s.start >= s.request.num_prompt_tokens:
                rec.decode_rows += 1
            else:
                rec.prefill_tokens += s.num_tokens
        rec.encoder_items = len(sched.encoder_inputs)
        for req, idx in sched.encoder_inputs:
            rec.encoder_tokens += req.mm_positions[idx].length
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            rec.events = (start, None)
        self.steps.append(rec)
        return rec

    def launched(self, rec: StepRecord, launch_s: float) -> None:
        rec.launch_s = launch_s
        if self.cuda and rec.events is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            rec.events = (rec.events[0], end)

    def dump(self) -> None:
        """Writes the trace (once). Synchronizes the GPU first: call it at shutdown."""
        if self._written:
            return
        self._written = True
        first = None
        if self.cuda and self.steps:
            torch.cuda.synchronize()
            first = self.steps[0].events[0] if self.steps[0].events else None
        with open(self.path, "w") as f:
            for rec in self.steps:
                if rec.t < 0:
                    continue  # the end-of-recording mark
                if first is not None and rec.events is not None and rec.events[1] is not None:
                    rec.gpu_start_s = first.elapsed_time(rec.events[0]) / 1e3
                    rec.gpu_end_s = first.elapsed_time(rec.events[1]) / 1e3
                rec.events = None
                f.write(json.dumps(asdict(rec)) + "\n")
        logger.info("step trace: %d steps written to %s", len(self.steps), self.path)
