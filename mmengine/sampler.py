"""Turn the logits of one step into tokens (and logprobs), on the model's device.

Order, as in vLLM: raw logprobs (for the user) -> min_tokens mask -> penalties ->
greedy argmax, or temperature -> min-p -> top-k -> top-p -> an exponential race
(``argmax(p / q)``, q ~ Exp(1)), which needs no host sync and, with a per-request
generator, gives the same draw whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoders.staging import host_to_device
from mmengine.messages import TokenLogprobs


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
    generator: torch.Generator | None  # per-request seeded generator, or None
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


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p; masked entries become -inf."""
    dev = logits.device
    temp = _dev([max(r.temperature, 1e-5) for r in rows], dev)[:, None]
    logits = logits / temp
    if any(r.min_p > 0 for r in rows):
        probs = logits.softmax(-1)
        min_p = _dev([r.min_p for r in rows], dev)[:, None]
        logits = torch.where(
            probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"), logits
        )
    if any(r.top_k > 0 for r in rows):
        logits = _top_k(logits, rows)
    if any(r.top_p < 1.0 for r in rows):
        top_p = _dev([r.top_p for r in rows], dev)[:, None]
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first stays).
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        logits = torch.where(drop, float("-inf"), logits)
    return logits


# Up to this k, top-k finds each row's k-th largest logit with `topk` (a selection) instead
# of sorting the whole vocabulary. The threshold, and so the result, is the same. Sampling
# with temperature + top-k 50 over 151,936 logits on the 2-core dev CPU: 12.7 -> 2.8 ms at
# batch 1, 555 -> 224 ms at batch 64 (benchmarks/bench_sampler.py; not yet timed on a GPU).
_TOPK_SELECT_MAX = 1024


def _top_k(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Masks (-inf) every logit below its row's k-th largest; rows with top_k 0 keep all.
    Ties with the k-th value stay, as with a sort."""
    vocab = logits.shape[-1]
    ks = [min(r.top_k, vocab) if r.top_k > 0 else 0 for r in rows]  # 0: no top-k
    k = _dev(ks, logits.device)[:, None]
    kmax = max(ks)
    if kmax <= _TOPK_SELECT_MAX:
        ranked = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
    else:
        ranked = logits.sort(-1, descending=True).values
    kth = torch.where(k > 0, ranked.gather(1, (k - 1).clamp(min=0)), float("-inf"))
    return torch.where(logits < kth, float("-inf"), logits)


def _exponential(rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """Exponential(1) noise per row: seeded rows from their own generator, the rest from
    the device's default one. The whole batch is filled at once and seeded rows are then
    redrawn through views: indexing a CUDA tensor with a Python list of rows (as this did
    until session 7) copies the list to the device from pageable memory, which makes the
    host wait for all queued GPU work, every step with a non-greedy request."""
    q = torch.empty(len(rows), vocab, device=device)
    if any(r.generator is None for r in rows):
        q.exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            q[i].exponential_(generator=r.generator)
    return q


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
    want_lp = [r.num_logprobs is not None for r in rows]
    raw_logprobs = logits.log_softmax(-1) if any(want_lp) else None

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
        probs = _filter(logits, rows).softmax(-1)
        q = _exponential(rows, logits.shape[-1], logits.device)
        sampled = (probs / q).argmax(-1)
        tokens = torch.where(greedy, tokens, sampled)

    if raw_logprobs is None:
        return PendingSample(tokens, tokens, rows)
    k = max(r.num_logprobs or 0 for r in rows)
    chosen_lp = raw_logprobs.gather(1, tokens[:, None])
    ranks = (raw_logprobs > chosen_lp).sum(-1) + 1
    cols = [tokens[:, None].double(), chosen_lp.double(), ranks[:, None].double()]
    if k:
        top_lp, top_ids = raw_logprobs.topk(k, -1)
        cols += [top_lp.double(), top_ids.double()]
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
