"""Turn the logits of one step into tokens (and logprobs), on the model's device.

Order, as in vLLM: raw logprobs (for the user) -> min_tokens mask -> penalties ->
greedy argmax, or temperature -> min-p -> top-k -> top-p -> a random draw
(`mmkernels.sampling`: on the GPU one Triton kernel per step, with no sort of the vocabulary
and no host sync; elsewhere its sort-based torch reference). Every sampled row draws from its own
64-bit seed: a seeded request's come from its `SeedStream`, so its tokens are the same
whatever else is in the batch; the others' from the host's random generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from encoders.staging import host_to_device
from mmengine.messages import TokenLogprobs
from mmkernels.sampling import sample_from_logits

_MASK64 = (1 << 64) - 1


class SeedStream:
    """A seeded request's random stream: draw n gets a seed mixed (splitmix64) from the
    request's seed and n, so the draw depends on nothing else in the batch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.draws = 0

    def next_seed(self) -> int:
        z = ((self.seed & _MASK64) ^ (self.draws * 0xD1B54A32D192ED03)) & _MASK64
        self.draws += 1
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) >> 1  # 63 bits: fits an int64 tensor


# Seeds of the rows of unseeded requests.
_host_rng = random.Random()


@dataclass
class SamplingRow:
    """One request that samples a token this step."""

    temperature: float
    top_k: int  # 0: off
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    generator: SeedStream | None  # a seeded request's stream, or None
    num_logprobs: int | None
    blocked_token_ids: list[int]  # stop tokens masked until min_tokens is reached
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row


def _dev(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host list -> device tensor without a blocking copy (pinned staging on CUDA)."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def _token_counts(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float counts of each token id in each row's list."""
    width = max((len(x) for x in lists), default=0)
    counts = torch.zeros(len(lists), vocab + 1, device=device)
    if width:
        ids = torch.full((len(lists), width), vocab, dtype=torch.long)  # pad -> dummy column
        for i, x in enumerate(lists):
            if x:
                ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        ids = host_to_device(ids, device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Presence/frequency penalties on output tokens; HF-style repetition penalty on
    prompt and output tokens (divide positive logits, multiply negative ones)."""
    b, vocab = logits.shape
    dev = logits.device
    out_counts = _token_counts([r.output_token_ids for r in rows], vocab, dev)
    seen = out_counts > 0
    rep = _dev([r.repetition_penalty for r in rows], dev)[:, None]
    if any(r.repetition_penalty != 1.0 for r in rows):  # decided on the host: no sync
        prompt_seen = _token_counts([r.prompt_token_ids for r in rows], vocab, dev) > 0
        mask = seen | prompt_seen
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(mask, penalized, logits)
    freq = _dev([r.frequency_penalty for r in rows], dev)[:, None]
    pres = _dev([r.presence_penalty for r in rows], dev)[:, None]
    return logits - freq * out_counts - pres * seen.float()


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[B] tokens drawn after each row's temperature and filters (greedy rows: unused)."""
    settings = []  # (temperature, top_p, min_p, top_k, seed) per row
    for r in rows:
        if r.greedy:  # the cheapest settings; the caller takes the argmax for these rows
            settings.append((1.0, 1.0, 0.0, 0, 0))
            continue
        seed = r.generator.next_seed() if r.generator else _host_rng.getrandbits(63)
        settings.append((r.temperature, r.top_p, r.min_p, r.top_k, seed))
    # Pad to a multiple of 4 rows: the kernel reads each column as a row of one packed
    # tensor, and Triton compiles a variant per alignment of its pointers (a column at a
    # 4-byte offset is one): 16-byte aligned columns keep a single variant.
    settings += [(1.0, 1.0, 0.0, 0, 0)] * (-len(settings) % 4)
    temps, top_ps, min_ps, top_ks, seeds = (list(col) for col in zip(*settings))
    dev = logits.device
    floats = _dev([temps, top_ps, min_ps], dev, torch.float32)  # one copy per dtype
    ints = _dev([top_ks, seeds], dev, torch.long)
    sampled = [r for r in rows if not r.greedy]
    n = len(rows)
    return sample_from_logits(
        logits,
        floats[0, :n],
        ints[0, :n],
        floats[1, :n],
        floats[2, :n],
        ints[1, :n],
        use_top_k=any(r.top_k > 0 for r in sampled),
        max_top_k=max(top_ks),
    )


def warm_up_sampling(vocab: int, device: torch.device) -> int:
    """Runs the sampling kernel's variants once (without top-k, and with each width of
    its top-k candidate sort), so that the first request asking for one does not wait
    for its compile (9 s on an H200 for a top-k variant). Returns how many ran."""
    from mmkernels.sampling import _SMALL_CAP

    logits = torch.zeros(4, vocab, device=device)
    for top_k in (0, 1, _SMALL_CAP):  # no top-k; the narrow sort; the wide one
        row = SamplingRow(
            temperature=1.0, top_k=top_k, top_p=0.9, min_p=0.1, presence_penalty=0.0,
            frequency_penalty=0.0, repetition_penalty=1.0, generator=None,
            num_logprobs=None, blocked_token_ids=[], prompt_token_ids=[], output_token_ids=[],
        )  # fmt: skip
        _draw(logits, [row] * 4)
    return 3


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Sample one token per row of ``logits`` ([B, V], float32)."""
    return sample_async(logits, rows).result()


class PendingSample:
    """Tokens (and logprobs) sampled on the device, on their way to the host.

    ``token_ids`` stays on the device (a later step may read it there); the one
    device-to-host copy is started at once into pinned memory, and ``result()`` waits
    for it only when called: the host can plan the next step meanwhile.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, rows: list[SamplingRow]):
        self.token_ids = token_ids  # [B] int64, on the device
        self._rows = [r.num_logprobs for r in rows]
        self._k = max((n or 0 for n in self._rows), default=0)
        self._event = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        packed = self._host
        if packed.dim() == 1:  # tokens only
            return SamplerOutput(packed.tolist(), [None] * len(self._rows))
        k = self._k
        tok = packed[:, 0].long().tolist()
        lp = packed[:, 1].tolist()
        rank = packed[:, 2].long().tolist()
        top_lp = packed[:, 3 : 3 + k].tolist() if k else None
        top_ids = packed[:, 3 + k :].long().tolist() if k else None
        out: list[TokenLogprobs | None] = []
        for i, n in enumerate(self._rows):
            if n is None:
                out.append(None)
                continue
            ids = [tok[i]] + (top_ids[i][:n] if n else [])  # type: ignore[index]
            lps = [lp[i]] + (top_lp[i][:n] if n else [])  # type: ignore[index]
            out.append(TokenLogprobs(ids, lps, [rank[i]] + list(range(1, n + 1))))
        return SamplerOutput(tok, out)


def sample_async(logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
    """``sample`` without waiting for the device: the tokens stay there until asked for."""
    logits = logits.float()
    raw = logits  # the user's logprobs are of the unmodified distribution
    want_lp = any(r.num_logprobs is not None for r in rows)

    vocab = logits.shape[1]
    blocked = [(i, t) for i, r in enumerate(rows) for t in r.blocked_token_ids if t < vocab]
    if blocked:
        # One (row, id) index for the whole batch, through pinned memory: indexing with
        # Python lists would copy them to the device synchronously, row by row.
        rows_t = _dev([i for i, _ in blocked], logits.device, torch.long)
        ids_t = _dev([t for _, t in blocked], logits.device, torch.long)
        logits = logits.index_put((rows_t, ids_t), logits.new_full((), float("-inf")))
    if any(r.needs_penalties for r in rows):
        logits = apply_penalties(logits, rows)

    tokens = logits.argmax(-1)
    if not all(r.greedy for r in rows):
        greedy = _dev([r.greedy for r in rows], logits.device)
        tokens = torch.where(greedy, tokens, _draw(logits, rows))

    if not want_lp:
        return PendingSample(tokens, tokens, rows)
    k = max(r.num_logprobs or 0 for r in rows)
    # Logprobs as logit - logsumexp, without a [B, V] log_softmax.
    lse = raw.logsumexp(-1, keepdim=True)
    chosen = raw.gather(1, tokens[:, None])
    ranks = (raw > chosen).sum(-1) + 1
    cols = [tokens[:, None].double(), (chosen - lse).double(), ranks[:, None].double()]
    if k:
        top, top_ids = raw.topk(k, -1)
        cols += [(top - lse).double(), top_ids.double()]
    # One device->host copy for everything (ids < 2**53 are exact in float64).
    return PendingSample(tokens, torch.cat(cols, dim=1), rows)


def prompt_logprobs(
    logits: torch.Tensor,  # [N, V]: logits at N consecutive prompt positions
    next_token_ids: list[int],  # [N]: the prompt token that follows each position
    k: int,
) -> list[TokenLogprobs]:
    """Logprob (and rank) of each actual next prompt token, plus the top-k."""
    lp = logits.float().log_softmax(-1)
    ids = _dev(next_token_ids, lp.device, torch.long)
    chosen = lp.gather(1, ids[:, None])
    ranks = ((lp > chosen).sum(-1) + 1).tolist()
    chosen_l = chosen[:, 0].tolist()
    if k:
        top_lp, top_ids = lp.topk(k, -1)
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    out = []
    for i, t in enumerate(next_token_ids):
        ids_i = [t] + (top_ids_l[i] if k else [])
        lps_i = [chosen_l[i]] + (top_lp_l[i] if k else [])
        out.append(TokenLogprobs(ids_i, lps_i, [ranks[i]] + list(range(1, k + 1))))
    return out
