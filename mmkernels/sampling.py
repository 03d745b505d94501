"""Random sampling of one token per row of logits: temperature, min-p, top-k, top-p.

The filters mean what HF's warpers (and vLLM's sampler) mean, applied in that order:
logits are divided by the temperature; min-p drops tokens whose probability is below
`min_p` times the row's largest; top-k keeps the k largest (ties with the k-th stay); top-p
keeps, of what is left and renormalized, the tokens whose probability mass strictly above
them is below `top_p` (the smallest set reaching the mass; tokens tied with its last one
stay). The token is then drawn from the kept tokens in proportion to their probability.

The torch reference sorts the vocabulary for top-p, which on a GPU costs more than the
forward it follows (5.2 ms at 256 rows x 151,936 on an H200, `bench_sampler.py`). The
kernel needs no sort, no [B, V] temporaries and no random number per token; one program
per row streams the row a few times:

- the draw inverts the CDF: one pass sums the kept tokens' exp(s - max), a second walks
  the row in token order until the running sum passes u times that total, u ~ U(0, 1) from
  Philox keyed by the row's 64-bit seed (so a seeded row's draw does not depend on the rest
  of the batch). A Gumbel-max draw needs a random number per token instead, and its Philox
  made the first version of this kernel compute-bound (0.15 ms per pass of one row);
- min-p is a threshold on the scaled logit (s >= max + log(min_p)): one max pass;
- top-k's threshold, the k-th largest scaled logit, is a radix select over the
  order-preserving integer keys of the fp32 values, four passes of 8-bit histograms, which
  count only the tokens at or above the k-th largest of the per-lane maxima of a first
  pass (a lower bound: k distinct tokens reach it), a few times k of them;
- top-p needs no threshold: a drawn token is accepted when the kept mass above it is below
  top_p of the kept mass; otherwise every token at or below it is outside the nucleus too,
  and the next draw is from the tokens above it, whose total that check just measured
  (rejection sampling: conditioning a draw from a superset on landing in the nucleus gives
  exactly the nucleus distribution). An accepted first draw costs three passes in all.
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton

_BLOCK = 4096  # vocabulary entries per loop iteration
_NUM_WARPS = 16
_MAX_ROUNDS: tl.constexpr = tl.constexpr(4096)  # top-p draws per row at most (a guard)
_CAP = 2048  # most top-k candidates sorted in registers (more: radix select over the row)
_SMALL_CAP = 256  # the narrow sort, for batches whose largest k is at most a quarter of it


def _candidate_cap(max_top_k: int | None) -> int:
    """Sort width for the top-k candidates: _SMALL_CAP when 4x the largest k fits in it,
    else _CAP (also when the largest k is not known on the host).

    Two widths only: each is a kernel variant, compiled at engine start-up, and a top-k
    variant takes ~9 s to compile on an H200 (session 13: a width per power of two
    compiled mid-run whenever a batch's largest k crossed one)."""
    if max_top_k is None or 4 * max_top_k > _SMALL_CAP:
        return _CAP
    return min(_SMALL_CAP, _CAP)


@triton.jit
def _scaled_logits(x_row, offs, valid, inv_t):
    return tl.load(x_row + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _sign_and_ones():
    """uint32 0x80000000 and 0xFFFFFFFF (x ^ ones, not ~x: the interpreter rejects ~ on
    uint32, and the compiler rejects uint32 literals above 2**31)."""
    sign = tl.full((), -(2**31), tl.int32).to(tl.uint32, bitcast=True)
    ones = tl.full((), -1, tl.int32).to(tl.uint32, bitcast=True)
    return sign, ones


@triton.jit
def _order_key(s):
    """fp32 -> uint32 whose unsigned order is the float order (for finite values and inf)."""
    bits = s.to(tl.uint32, bitcast=True)
    sign, ones = _sign_and_ones()
    return tl.where((bits & sign) != 0, bits ^ ones, bits | sign)


@triton.jit
def _kth_largest(
    x_row, scratch_row, inv_t, vocab, k, lane_max, CAP: tl.constexpr, BLOCK: tl.constexpr
):
    """The k-th largest of a row's scaled logits (1 <= k < vocab), given the per-lane
    maxima of a pass over it.

    The k-th largest lane maximum is a lower bound (k distinct tokens reach it), and
    usually only a few times k tokens do: one pass copies them to `scratch_row`, and a sort
    of at most CAP of them gives the answer. Past CAP, a radix select over the row's
    order-preserving integer keys (four passes of 8-bit histograms of the tokens at or
    above the bound) does.
    """
    arange = tl.arange(0, BLOCK)
    picked = tl.sum(tl.where(arange == k - 1, tl.sort(lane_max, descending=True), 0.0), 0)
    lower = tl.where(k <= BLOCK, picked, float("-inf"))

    count = tl.full((), 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + arange
        s = _scaled_logits(x_row, offs, offs < vocab, inv_t)
        hit = (offs < vocab) & (s >= lower)
        slot = count + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(scratch_row + slot, s, mask=hit & (slot < CAP))
        count += tl.sum(hit.to(tl.int32), 0)
    tl.debug_barrier()  # the copies above, by every thread, before the loads below

    if count <= CAP:
        c = tl.arange(0, CAP)
        found = tl.load(scratch_row + c, mask=c < count, other=float("-inf"))
        kth = tl.sum(tl.where(c == k - 1, tl.sort(found, descending=True), 0.0), 0)
    else:
        bins = tl.arange(0, 256)
        prefix = tl.full((), 0, tl.uint32)
        k_left = k
        for i in tl.static_range(4):
            shift = 24 - 8 * i
            counts = tl.zeros([256], tl.int32)
            for start in range(0, vocab, BLOCK):
                offs = start + arange
                valid = offs < vocab
                s = _scaled_logits(x_row, offs, valid, inv_t)
                key = _order_key(s)
                match = valid & (s >= lower)
                if i > 0:  # the digits above this one equal the prefix found so far
                    match = match & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                counts += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
            at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
            digit = tl.sum((at_or_above >= k_left).to(tl.int32), 0) - 1
            k_left -= tl.sum(tl.where(bins > digit, counts, 0), 0)
            prefix = prefix | (digit.to(tl.uint32) << shift)
        sign, ones = _sign_and_ones()
        bits = tl.where((prefix & sign) != 0, prefix ^ sign, prefix ^ ones)
        kth = bits.to(tl.float32, bitcast=True)
    return kth


@triton.jit
def _draw(x_row, inv_t, vocab, floor, above, shift, target, BLOCK: tl.constexpr):
    """The first token (in id order) at which the running sum of exp(s - shift) over the
    tokens with s >= floor and s > above passes `target`; if rounding leaves the total
    short of it, the last such token."""
    arange = tl.arange(0, BLOCK)
    token = tl.full((), -1, tl.int32)
    last = tl.full((), 0, tl.int32)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        if token < 0:
            offs = start + arange
            s = _scaled_logits(x_row, offs, offs < vocab, inv_t)
            w = tl.where((s >= floor) & (s > above), tl.exp(s - shift), 0.0)
            chunk = tl.sum(w, 0)
            if total + chunk > target:
                # Positions before the crossing: their running sums stay <= target.
                before = tl.sum((total + tl.cumsum(w, 0) <= target).to(tl.int32), 0)
                token = start + before
            last = tl.maximum(last, tl.max(tl.where(w > 0, offs, 0), 0))
            total += chunk
    return tl.where(token >= 0, token, last)


@triton.jit
def _sample_kernel(
    out_ptr,  # int64 [num_rows]
    x_ptr,  # [num_rows, vocab] logits, last dim contiguous
    stride_row,
    temperature_ptr,  # fp32 [num_rows], > 0
    top_k_ptr,  # int32 or int64 [num_rows], 0 = off
    top_p_ptr,  # fp32 [num_rows], 1 = off
    min_p_ptr,  # fp32 [num_rows], 0 = off
    seed_ptr,  # int64 [num_rows]
    scratch_ptr,  # fp32 [num_rows, CAP] (USE_TOP_K): top-k candidates
    vocab,
    CAP: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_TOP_K: tl.constexpr,
):
    # Min-p and top-p are decided per row at run time (one program per row, so the branch
    # is uniform): as compile-time switches they made four kernel variants of each width.
    # Top-k stays one: its code (two sorts in registers) is most of the compile time.
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_row
    inv_t = 1.0 / tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    arange = tl.arange(0, BLOCK)

    # Inclusive lower bound on kept scaled logits.
    floor = tl.full((), float("-inf"), tl.float32)
    need_max = min_p > 0.0
    if USE_TOP_K:
        k = tl.load(top_k_ptr + row)
        use_k = (k > 0) & (k < vocab)
        need_max = need_max | use_k
    if need_max:
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + arange
            lane_max = tl.maximum(lane_max, _scaled_logits(x_row, offs, offs < vocab, inv_t))
        if min_p > 0.0:
            # p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p).
            floor = tl.max(lane_max, 0) + tl.log(min_p)
        if USE_TOP_K:
            if use_k:
                scratch_row = scratch_ptr + row.to(tl.int64) * CAP
                kth = _kth_largest(x_row, scratch_row, inv_t, vocab, k, lane_max, CAP, BLOCK)
                floor = tl.maximum(floor, kth)

    # The kept set's softmax normalizer: online max and sum, per lane.
    run_max = tl.full([BLOCK], -3.0e38, tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + arange
        s = _scaled_logits(x_row, offs, offs < vocab, inv_t)
        s = tl.where(s >= floor, s, float("-inf"))
        new_max = tl.maximum(run_max, s)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(s - new_max)
        run_max = new_max
    set_max = tl.max(run_max, 0)
    set_mass = tl.sum(run_sum * tl.exp(run_max - set_max), 0)

    no_bound = float("-inf")
    u = tl.rand(seed, tl.full((), 0, tl.int32))
    token = _draw(x_row, inv_t, vocab, floor, no_bound, set_max, u * set_mass, BLOCK)
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1.0:
        done = top_p >= 1.0
        rnd = tl.full((), 1, tl.int32)
        while not done:
            s_tok = tl.load(x_row + token).to(tl.float32) * inv_t
            mass_above = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + arange
                s = _scaled_logits(x_row, offs, offs < vocab, inv_t)
                mass_above += tl.where((s >= floor) & (s > s_tok), tl.exp(s - set_max), 0.0)
            mass = tl.sum(mass_above, 0)
            # Nothing above the token means a mass of 0: accepted. Rejected only when the
            # comparison holds, so NaN logits end the loop instead of spinning the GPU;
            # the round cap is a second guard (exact arithmetic needs < vocab rounds).
            done = not (mass >= top_p * set_mass)
            done = done | (rnd >= _MAX_ROUNDS)
            if not done:
                u = tl.rand(seed, rnd)
                token = _draw(x_row, inv_t, vocab, floor, s_tok, set_max, u * mass, BLOCK)
            rnd += 1
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_from_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    *,
    use_top_k: bool = True,
    max_top_k: int | None = None,
    use_triton_kernel: bool | None = None,
) -> torch.Tensor:
    """One random token per row of `logits`, drawn after the temperature and filters.

    Args:
        logits: [num_rows, vocab], fp32/bf16/fp16, last dim contiguous; -inf entries are
            never drawn (unless a row has nothing else).
        temperature: fp32 [num_rows], > 0.
        top_k: int32 or int64 [num_rows], 0 = off (values >= vocab are off too).
        top_p: fp32 [num_rows] in (0, 1], 1 = off.
        min_p: fp32 [num_rows] in [0, 1], 0 = off.
        seeds: int64 [num_rows]: the row's random stream for this draw. The same seed and
            logits give the same token, whatever else is in the batch (per implementation:
            the kernel and the reference draw different numbers).
        use_top_k: False skips top-k for the whole batch (the caller knows from the host
            that no row uses it): a kernel variant without the top-k code. True applies
            each row's k, 0 included. Min-p and top-p are applied per row (off values
            cost a load).
        max_top_k: the largest k of the batch if the caller knows it on the host: a small
            one narrows the sort of top-k candidates (None: the widest, always correct).
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.

    Returns:
        int64 [num_rows] token ids, on the logits' device; nothing is copied to the host.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab], got {tuple(logits.shape)}")
    if not use_triton(logits, use_triton_kernel):
        return sample_from_logits_torch(logits, temperature, top_k, top_p, min_p, seeds)
    check_launchable(_sample_kernel, logits)
    num_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    if num_rows == 0:
        return out
    cap = _candidate_cap(max_top_k) if use_top_k else 1
    scratch = torch.empty((num_rows if use_top_k else 1, cap), device=logits.device)
    _sample_kernel[(num_rows,)](
        out,
        logits,
        logits.stride(0),
        temperature.float().contiguous(),
        top_k.contiguous(),
        top_p.float().contiguous(),
        min_p.float().contiguous(),
        seeds.long().contiguous(),
        scratch,
        vocab,
        CAP=cap,
        BLOCK=min(_BLOCK, next_power_of_2(vocab)),
        USE_TOP_K=use_top_k,
        num_warps=_NUM_WARPS,
    )
    return out


# Up to this k, top-k finds each row's k-th largest logit with `topk` (a selection) instead
# of sorting the whole vocabulary (same threshold). On the 2-core dev CPU, temperature +
# top-k 50 over 151,936 logits: 12.7 -> 2.8 ms at batch 1 (session 7).
_TOPK_SELECT_MAX = 1024


def filter_logits_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """The scaled logits with every filtered-out entry at -inf (reference semantics).

    top-p keeps a token when the renormalized mass strictly above it is below top_p; of
    tokens tied in value, all or none stay.
    """
    logits = logits.float() / temperature.float()[:, None]
    if bool((min_p > 0).any()):
        floor = logits.max(-1, keepdim=True).values + min_p.float()[:, None].log()
        logits = logits.masked_fill(logits < floor, float("-inf"))
    vocab = logits.shape[-1]
    ks = torch.where((top_k > 0) & (top_k < vocab), top_k.long(), 0)
    kmax = int(ks.max()) if ks.numel() else 0
    if kmax > 0:
        if kmax <= _TOPK_SELECT_MAX:
            ranked = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
        else:
            ranked = logits.sort(-1, descending=True).values
        kth = ranked.gather(1, (ks[:, None] - 1).clamp(min=0))
        kth = torch.where(ks[:, None] > 0, kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        probs = logits.softmax(-1)
        # Mass strictly above each token: sort descending, sum the groups of larger values.
        sorted_probs, idx = probs.sort(-1, descending=True)
        sorted_logits = logits.gather(1, idx)
        cum = sorted_probs.cumsum(-1)
        # First position of each run of equal logits: the mass above the run is the same
        # for all of its tokens (the cumsum just before the run starts).
        new_run = torch.ones_like(sorted_logits, dtype=torch.bool)
        new_run[:, 1:] = sorted_logits[:, 1:] != sorted_logits[:, :-1]
        before = torch.where(new_run, cum - sorted_probs, torch.zeros_like(cum))
        run_start = (
            torch.where(new_run, torch.arange(vocab, device=logits.device), torch.zeros_like(idx))
            .cummax(-1)
            .values
        )
        above = before.gather(1, run_start)
        drop_sorted = above >= top_p.float()[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch reference of `sample_from_logits`: sort-based filters, then a Gumbel-max
    draw with noise from a generator seeded by each row's seed (reads the seeds on the
    host, so it synchronizes)."""
    kept = filter_logits_torch(logits, temperature, top_k, top_p, min_p)
    noise = torch.empty_like(kept)
    for i, seed in enumerate(seeds.tolist()):
        gen = torch.Generator(device=kept.device).manual_seed(seed & ((1 << 63) - 1))
        noise[i].exponential_(generator=gen)  # -log(Exp(1)) is a Gumbel
    return (kept - noise.log()).argmax(-1)
