"""Per-request state held by the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from mmengine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED_STOPPED = "stop"  # EOS or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"  # aborted by the client or the frontend (stop string)

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class MMPosition:
    """One multimodal item of a prompt, as the KV hashing and scheduler see it."""

    content_hash: str  # identifies the pixels (or the user's uuid)
    offset: int  # first placeholder token in the prompt
    length: int  # number of placeholder tokens (== embedding rows)


@dataclass
class Request:
    """A request inside the engine core: its tokens, progress and KV blocks.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; each step the
    scheduler lets it catch up with ``num_tokens`` (prompt plus generated tokens).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: the other completions of a prompt name the first one here; they wait until
    # it has computed the prompt, then share its full prompt blocks.
    share_prompt_with: str | None = None
    mm_positions: list[MMPosition] = field(default_factory=list)  # sorted by offset
    # The preprocessed items (``processors.types.MultiModalItem``, pixels included),
    # aligned with mm_positions; the scheduler never looks inside.
    mm_inputs: list[Any] = field(default_factory=list)
    mrope_positions: Any = None  # Qwen2-VL family: int64 tensor [3, num_prompt_tokens]
    mrope_delta: int = 0  # generated token at index i has M-RoPE position i + delta

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled by a step whose results the host has not read yet (async scheduling:
    # the next step is planned while the previous one still runs on the GPU). The
    # scheduler counts them as already there; their ids live on the device until then.
    num_output_placeholders: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first scheduling (-1: not yet)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of tokens
    block_hash_keys: list[tuple] = field(default_factory=list)  # what each hash covers

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Tokens once every step in flight has landed: known ones plus placeholders."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def needs_sync_steps(self) -> bool:
        """No step may be planned before the previous one's results are on the host:
        penalties read every earlier output token there, and prompt logprobs come in
        chunks that a preemption must not see twice."""
        sp = self.sampling_params
        return sp.has_penalties or sp.prompt_logprobs is not None
