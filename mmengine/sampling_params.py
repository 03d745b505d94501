"""Sampling parameters of one request, in vLLM's conventions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Bounds that keep one request from taking the whole engine (SECURITY.md item 10).
MAX_N = 64
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_LEN = 512
# Integer parameters become int64 tensors and msgspec fields in the engine core: an
# unbounded one (top_k = 2**63) failed there and took the engine down with it.
MAX_COUNT = 2**31 - 1  # top_k, max_tokens, min_tokens, stop token ids
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # seeds: anything a 64-bit seed holds


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Defaults follow vLLM: greedy when ``temperature == 0``, ``max_tokens=16``.
    """

    n: int = 1  # number of completions for the prompt (they share its KV blocks)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0  # drop tokens whose prob is below min_p * max prob
    seed: int | None = None  # per-request seed: same seed, same output, in any batch
    presence_penalty: float = 0.0  # subtract once per token present in the output
    frequency_penalty: float = 0.0  # subtract per occurrence in the output
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0  # stop tokens and EOS are masked until this many are generated
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (kept in ids)
    ignore_eos: bool = False  # keep generating past EOS
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (sampled token added)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range parameter."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name!r}: {why}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_COUNT:
            raise bad(
                "top_k",
                f"must be 0/-1 (disabled) or an integer in [1, {MAX_COUNT}], got {self.top_k}",
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if self.max_tokens is not None and (
            not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_COUNT
        ):
            raise bad(
                "max_tokens", f"must be an integer in [1, {MAX_COUNT}], got {self.max_tokens!r}"
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= MAX_COUNT:
            raise bad(
                "min_tokens", f"must be an integer in [0, {MAX_COUNT}], got {self.min_tokens!r}"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "must not exceed max_tokens")
        if self.seed is not None and (
            not _is_int(self.seed) or not INT64_MIN <= self.seed <= UINT64_MAX
        ):
            raise bad("seed", f"must be a 64-bit integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                raise bad(
                    "stop", f"stop strings must be non-empty and <= {MAX_STOP_STRING_LEN} chars"
                )
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= MAX_COUNT:
                raise bad("stop_token_ids", f"must be integers in [0, {MAX_COUNT}], got {t!r}")

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty on: sampling reads the token history."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def for_child(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of ``n`` completions: n=1, seed offset by index."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
