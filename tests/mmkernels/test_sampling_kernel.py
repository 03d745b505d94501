"""sample_from_logits: the Triton kernel (sort-free filters, Gumbel-max draw) against the
torch reference's filters.

The two draw different random numbers, so they are compared by what they may draw and how
often: every kernel draw must be a token the reference keeps, and over many rows with fixed
seeds the kernel's frequencies must match the reference's kept probabilities. Seeds are
fixed, so each test is deterministic.
"""

import math

import pytest
import torch

import mmkernels.sampling as sampling
from mmkernels.sampling import filter_logits_torch, sample_from_logits

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def small_candidate_cap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sorting the default 2048 top-k candidates takes seconds per row in the interpreter:
    CPU tests sort at most 16 unless they say otherwise (the GPU tests keep the default)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(sampling, "_CAP", 16)


def params(n: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, device="cpu"):
    """Per-row parameter tensors; each argument is a scalar or a list of n values."""

    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dtype, device=device)

    return (
        col(temperature, torch.float32),
        col(top_k, torch.int64),
        col(top_p, torch.float32),
        col(min_p, torch.float32),
    )


def draw(logits, p, seeds, **flags):
    return sample_from_logits(logits, *p, seeds, use_triton_kernel=True, **flags)


# ---- the reference's filters -----------------------------------------------------------


def _top_k_by_sort(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    out = logits.clone()
    for i, k in enumerate(ks):
        if 0 < k < logits.shape[1]:
            kth = logits[i].sort(descending=True).values[k - 1]
            out[i][logits[i] < kth] = NEG_INF
    return out


@pytest.mark.parametrize("select_max", [1024, 0], ids=["topk-select", "full-sort"])
def test_reference_top_k_keeps_the_same_tokens_as_a_full_sort_ties_included(
    select_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampling, "_TOPK_SELECT_MAX", select_max)
    gen = torch.Generator().manual_seed(3)
    # Quarter steps: many exact ties (as bf16 logits have); a row already partly -inf.
    logits = (torch.randn(7, 500, generator=gen) * 4).round() / 4
    logits[4, ::3] = NEG_INF
    ks = [0, 1, 3, 50, 7, 500, 10_000]  # off, the best only, ..., the whole vocab and more
    got = filter_logits_torch(logits, *params(7, top_k=ks)[:1], *params(7, top_k=ks)[1:])
    assert torch.equal(got, _top_k_by_sort(logits, ks))
    assert torch.equal(got[0], logits[0]) and (got[1] > NEG_INF).sum() >= 1


def test_reference_top_p_keeps_the_smallest_set_reaching_the_mass_and_its_ties() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.2, 0.2, 0.2]])
    kept = filter_logits_torch(probs.log(), *params(2, top_p=0.85)) > NEG_INF
    # Row 0: the mass above token 2 is 0.8 < 0.85, above token 3 it is 0.95.
    # Row 1: above each 0.2 token is 0.4 < 0.85: the three tied tokens stay together.
    assert kept.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_reference_min_p_and_top_p_renormalize_after_the_earlier_filters() -> None:
    probs = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]])
    # top-k 3 leaves 0.3/0.75, 0.25/0.75, 0.2/0.75 = 0.4, 0.33, 0.27: top-p 0.7 keeps two.
    kept = filter_logits_torch(probs.log(), *params(1, top_k=3, top_p=0.7)) > NEG_INF
    assert kept.tolist() == [[True, True, False, False, False]]


# ---- the kernel: what it may draw --------------------------------------------------------

SETTINGS = {
    "temperature": dict(temperature=0.7),
    "min-p": dict(temperature=1.3, min_p=0.2),
    "top-k": dict(top_k=[1, 2, 5, 17, 40, 0]),
    "top-p": dict(top_p=[0.05, 0.5, 0.9, 0.99, 1.0, 0.7]),
    "all": dict(
        temperature=[0.5, 1.0, 2.0, 0.9, 1.1, 3.0],
        top_k=[0, 3, 20, 60, 1, 7],
        top_p=[0.8, 1.0, 0.6, 0.95, 0.9, 0.3],
        min_p=[0.0, 0.05, 0.0, 0.01, 0.3, 0.0],
    ),
}


CASES = [(name, 64) for name in SETTINGS] + [("top-k", 4), ("all", 4)]


@pytest.mark.parametrize(
    ("setting", "cap"),
    CASES,
    ids=[f"{n}-cap{c}" if c < 64 else n for n, c in CASES],
)
def test_kernel_draws_only_tokens_the_reference_keeps(
    setting: str, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64-wide loop steps over 300 tokens: several chunks, the last one partly masked. A cap
    # of 4 top-k candidates sends most top-k rows to the radix-select fallback, 64 to the
    # sort of the candidates.
    monkeypatch.setattr(sampling, "_BLOCK", 64)
    monkeypatch.setattr(sampling, "_CAP", cap)
    gen = torch.Generator().manual_seed(11)
    rows, reps = 6, 8
    base = (torch.randn(rows, 300, generator=gen) * 3).round() / 2  # ties
    base[2, 250:] = NEG_INF  # a blocked tail
    base[3] -= 40.0  # all negative
    logits = base.repeat(reps, 1)
    p = params(rows, **SETTINGS[setting])
    p = tuple(t.repeat(reps) for t in p)
    kept = filter_logits_torch(logits, *p) > NEG_INF
    seeds = torch.arange(rows * reps) * 7919 + 5
    tokens = draw(logits, p, seeds)
    assert tokens.dtype == torch.long and tokens.shape == (rows * reps,)
    assert kept.gather(1, tokens[:, None]).all(), (tokens, kept.sum(-1))


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_kernel_filters_that_keep_one_token_draw_the_argmax(filters: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 100, generator=gen) * 2
    tokens = draw(logits, params(16, temperature=1.5, **filters), torch.arange(16) + 3)
    assert tokens.tolist() == logits.argmax(-1).tolist()


# ---- the kernel: how often ---------------------------------------------------------------


def _assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """No draw outside the support, and a chi-square statistic within its mean + 5 sd
    (false alarm well under 1e-4; seeds are fixed anyway, so each test is deterministic)."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    support = expected > 0
    assert (counts[~support] == 0).all(), f"draws outside the support: {counts.tolist()}"
    chi2 = float(((counts - expected)[support] ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert chi2 <= dof + 5 * (2 * dof) ** 0.5, (
        f"chi2 {chi2:.1f} (dof {dof}): counts {counts.tolist()} "
        f"expected {expected.round().tolist()}"
    )


DIST_LOGITS = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, NEG_INF, -3.0])


@pytest.mark.parametrize(
    "setting",
    [
        dict(temperature=1.0),
        dict(temperature=6.0, top_p=0.3),  # flat: 3 of 10 kept, most first draws rejected
        dict(temperature=1.4, top_k=5, top_p=0.9),
    ],
    ids=["temperature", "top-p", "top-k+top-p"],
)
def test_kernel_frequencies_match_the_kept_distribution(setting: dict) -> None:
    # Few draws (the interpreter runs ~10 ms per row); the GPU test draws 4096 per row.
    n = 500
    logits = DIST_LOGITS.expand(n, -1).contiguous()
    p = params(n, **setting)
    probs = filter_logits_torch(logits[:1], *(t[:1] for t in p)).softmax(-1)[0]
    tokens = draw(logits, p, torch.arange(n) * 104729 + 17)
    _assert_frequencies_match(tokens, probs)


def test_kernel_top_k_draws_every_token_tied_with_the_kth() -> None:
    logits = torch.zeros(40)
    logits[[3, 9, 20, 33]] = torch.tensor([2.0, 1.0, 1.0, 1.0])  # k = 2: three tied 2nd
    n = 120
    tokens = draw(
        logits.expand(n, -1).contiguous(), params(n, temperature=50.0, top_k=2), torch.arange(n)
    )
    assert set(tokens.tolist()) == {3, 9, 20, 33}


# ---- the kernel: seeds -----------------------------------------------------------------


def test_kernel_seeded_draw_depends_only_on_its_seed_and_logits() -> None:
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(100, generator=gen)
    others = torch.randn(5, 100, generator=gen) * 3

    def token_at(position: int, batch: int, seed: int) -> int:
        logits = others[:batch].clone()
        logits[position] = row
        # Other rows use other filters, which turns on the batch-wide filter passes.
        p = params(
            batch,
            temperature=[0.9] * batch,
            top_k=[5] * batch,
            top_p=[0.5] * batch,
            min_p=[0.1] * batch,
        )
        for t, v in zip(p, (0.9, 0, 1.0, 0.0), strict=True):
            t[position] = v
        seeds = torch.arange(batch) + 1000
        seeds[position] = seed
        return int(draw(logits, p, seeds)[position])

    alone = [token_at(0, 1, s) for s in range(8)]
    assert len(set(alone)) > 3  # the seed decides, not the logits alone
    assert [token_at(3, 5, s) for s in range(8)] == alone
    assert [token_at(1, 2, s) for s in range(8)] == alone


# ---- on the GPU, at a real vocabulary ---------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_draws_kept_tokens_at_the_frequencies_of_a_real_vocabulary(dtype) -> None:
    dev = "cuda"
    vocab, n = 151_936, 4096
    gen = torch.Generator(device=dev).manual_seed(0)
    # A peaked row (as a trained model's are) over a noise floor, plus ties.
    row = torch.randn(vocab, device=dev, generator=gen)
    row[:8] = torch.tensor([9.0, 8.5, 8.5, 8.0, 7.0, 6.5, 6.0, 5.0], device=dev)
    logits = row.to(dtype).expand(n, -1).contiguous()
    p = params(n, temperature=0.8, top_k=6, top_p=0.97, min_p=0.001, device=dev)
    probs = filter_logits_torch(logits[:1], *(t[:1] for t in p)).softmax(-1)[0].cpu()
    tokens = draw(logits, p, torch.arange(n, device=dev) * 31 + 1).cpu()
    assert (probs[tokens] > 0).all()
    _assert_frequencies_match(tokens, probs)
    # A flat row: top-p keeps most of the vocabulary; top-k 1000 leaves exactly 1000.
    flat = torch.randn(64, vocab, device=dev, generator=gen).to(dtype)
    for setting in (dict(top_p=0.9), dict(top_k=1000), dict(top_k=1000, top_p=0.5)):
        p = params(64, device=dev, **setting)
        kept = filter_logits_torch(flat, *p) > NEG_INF
        tokens = draw(flat, p, torch.arange(64, device=dev))
        assert kept.gather(1, tokens[:, None]).all(), setting
    # Same seeds, same tokens; also with the candidate sort narrowed to the batch's k.
    again = draw(flat, p, torch.arange(64, device=dev))
    narrow = draw(flat, p, torch.arange(64, device=dev), max_top_k=1000)
    assert torch.equal(tokens, again) and torch.equal(tokens, narrow)
    p = params(64, device=dev, top_k=50)
    kept = filter_logits_torch(flat, *p) > NEG_INF
    for max_top_k in (None, 50):
        tokens = draw(flat, p, torch.arange(64, device=dev), max_top_k=max_top_k)
        assert kept.gather(1, tokens[:, None]).all(), max_top_k
    assert not math.isnan(float(tokens.float().mean()))


def test_kernel_returns_for_nan_logits_instead_of_looping() -> None:
    # A model that produced NaNs must not hang the GPU in the top-p loop.
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    logits[0] = float("nan")
    logits[1, ::2] = float("nan")
    logits[2, 7] = float("inf")
    tokens = draw(
        logits, params(3, top_k=[0, 5, 0], top_p=0.5, min_p=[0.0, 0.0, 0.1]), torch.arange(3)
    )
    assert ((tokens >= 0) & (tokens < 50)).all()
