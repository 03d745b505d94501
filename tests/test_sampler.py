"""Sampler on hand-made logits (CPU): greedy, filters, seeds, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from mmengine.sampler import SamplingRow, SeedStream, apply_penalties, prompt_logprobs, sample

torch.set_num_threads(1)

V = 32  # vocab of the hand-made logits


def make_row(**overrides: object) -> SamplingRow:
    """A plain temperature-1 row; override any field."""
    fields: dict[str, object] = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        generator=None,
        num_logprobs=None,
        blocked_token_ids=[],
        prompt_token_ids=[],
        output_token_ids=[],
    )
    fields.update(overrides)
    return SamplingRow(**fields)  # type: ignore[arg-type]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=seeded(seed)) * 2  # [rows, V]


def draws(logits: torch.Tensor, row: SamplingRow, n: int) -> list[int]:
    """``n`` samples of one row (its generator, if any, advances between them)."""
    return [sample(logits[None], [row]).token_ids[0] for _ in range(n)]


# ---- greedy and filters ---------------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    logits = random_logits(4)
    out = sample(logits, [make_row(temperature=0.0) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_greedy_row_in_a_sampled_batch_still_takes_the_argmax() -> None:
    logits = random_logits(3)
    rows = [make_row(), make_row(temperature=0.0), make_row(temperature=2.0)]
    for _ in range(5):
        assert sample(logits, rows).token_ids[1] == int(logits[1].argmax())


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(filters: dict[str, object]) -> None:
    logits = random_logits(4, seed=1)
    rows = [make_row(temperature=1.5, **filters) for _ in range(4)]
    for _ in range(10):
        assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_top_k_samples_only_the_k_best_tokens() -> None:
    logits = torch.zeros(V)
    logits[[3, 9, 20]] = torch.tensor([1.0, 0.9, 0.8])  # the three best, nearly tied
    seen = set(draws(logits, make_row(top_k=3, temperature=5.0), 300))
    assert seen == {3, 9, 20}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-12).log()
    # Mass before token 2 is 0.8 < 0.85: token 2 stays; before token 3 it is 0.95.
    seen = set(draws(logits, make_row(top_p=0.85), 400))
    assert seen == {0, 1, 2}


def test_min_p_drops_tokens_below_the_fraction_of_the_max_prob() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-12).log()
    # min_p 0.6: threshold 0.24 keeps tokens 0 and 1 only.
    seen = set(draws(logits, make_row(min_p=0.6), 300))
    assert seen == {0, 1}


def test_blocked_token_ids_are_never_sampled() -> None:
    logits = torch.zeros(V)
    logits[5] = 10.0  # the favourite
    logits[6] = 9.0
    blocked = [5, 11, V + 3]  # an id past the vocab is ignored
    assert sample(
        logits[None], [make_row(temperature=0.0, blocked_token_ids=blocked)]
    ).token_ids == [6]
    seen = draws(logits, make_row(temperature=3.0, blocked_token_ids=blocked), 300)
    assert 5 not in seen and 11 not in seen


# ---- seeds ----------------------------------------------------------------------------


def test_seeded_row_is_reproducible_whatever_else_is_in_the_batch() -> None:
    logits = torch.zeros(V)  # uniform: every draw is up to the random numbers

    def run(batch: int, position: int) -> list[int]:
        rows = [make_row() for _ in range(batch)]
        rows[position] = make_row(generator=SeedStream(1234))
        # Other rows: unseeded ones and another seed, all drawing from their own streams.
        if batch > 2:
            rows[(position + 1) % batch] = make_row(generator=SeedStream(99), top_k=5)
        out = []
        for _ in range(12):
            out.append(sample(logits.expand(batch, V), rows).token_ids[position])
        return out

    alone = run(1, 0)
    assert len(set(alone)) > 1  # the seed does not just pin one token
    assert run(2, 1) == alone
    assert run(4, 0) == alone
    assert run(5, 3) == alone


def test_unseeded_rows_vary() -> None:
    logits = torch.zeros(2, V)
    first = [sample(logits, [make_row(), make_row()]).token_ids for _ in range(12)]
    assert len({t for pair in first for t in pair}) > 3
    assert len({tuple(p) for p in first}) > 1


def test_same_seed_gives_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(V)
    a = draws(logits, make_row(generator=SeedStream(7)), 16)
    b = draws(logits, make_row(generator=SeedStream(7)), 16)
    c = draws(logits, make_row(generator=SeedStream(8)), 16)
    assert a == b and a != c


# ---- penalties ------------------------------------------------------------------------


def test_penalties_change_the_logits_by_the_documented_amounts() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -0.5, 3.0]])
    row = make_row(
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        prompt_token_ids=[0, 1],
        output_token_ids=[2, 2, 4],
    )
    out = apply_penalties(logits, [row])
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied
        0.5 / 2 - 0.5 * 2 - 0.3,  # output twice: repetition, 2 x frequency, presence
        1.0,  # unseen
        -0.5 * 2 - 0.5 * 1 - 0.3,  # output once
        3.0,  # unseen
    ]
    assert out[0].tolist() == pytest.approx(expected)


def test_presence_and_frequency_penalties_ignore_prompt_tokens() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    row = make_row(frequency_penalty=1.0, presence_penalty=1.0, prompt_token_ids=[0, 0, 1])
    assert apply_penalties(logits, [row])[0].tolist() == [1.0, 1.0, 1.0]


def test_penalties_apply_per_row() -> None:
    logits = torch.ones(2, 4)
    rows = [
        make_row(frequency_penalty=1.0, output_token_ids=[1, 1, 1]),
        make_row(output_token_ids=[1]),
    ]
    out = apply_penalties(logits, rows)
    assert out.tolist() == [[1.0, -2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    row = make_row(temperature=0.0, presence_penalty=1.0, output_token_ids=[0])
    assert sample(logits, [row]).token_ids == [1]


# ---- logprobs -------------------------------------------------------------------------


def test_logprobs_list_the_chosen_token_then_the_top_k_of_the_raw_logits() -> None:
    logits = random_logits(2, seed=3)
    raw = logits.log_softmax(-1)
    rows = [
        # Penalties, temperature and a block make the chosen token not the raw argmax.
        make_row(
            temperature=0.0,
            num_logprobs=3,
            blocked_token_ids=[int(logits[0].argmax())],
            repetition_penalty=3.0,
            prompt_token_ids=[int(logits[0].topk(2).indices[1])],
        ),
        make_row(
            temperature=0.7, num_logprobs=5, frequency_penalty=2.0, output_token_ids=[1, 2, 3]
        ),
    ]
    out = sample(logits, rows)
    for i, (row, tok, lp) in enumerate(zip(rows, out.token_ids, out.logprobs, strict=True)):
        assert lp is not None
        k = row.num_logprobs
        assert lp.token_ids[0] == tok
        rank = int((raw[i] > raw[i, tok]).sum()) + 1
        assert lp.ranks == [rank] + list(range(1, k + 1))
        top = raw[i].topk(k)
        assert lp.token_ids[1:] == top.indices.tolist()
        assert lp.logprobs[1:] == sorted(lp.logprobs[1:], reverse=True)
        expected = [raw[i, t].item() for t in lp.token_ids]
        assert lp.logprobs == pytest.approx(expected, abs=1e-6)
    assert out.logprobs[0].ranks[0] > 1  # the block really moved the choice


def test_rows_without_logprobs_get_none_and_zero_logprobs_gives_the_chosen_only() -> None:
    logits = random_logits(3, seed=4)
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=0.0, num_logprobs=0),
        make_row(num_logprobs=2),
    ]
    out = sample(logits, rows)
    assert out.logprobs[0] is None
    only = out.logprobs[1]
    assert only is not None and only.token_ids == [out.token_ids[1]] and only.ranks == [1]
    assert only.logprobs[0] == pytest.approx(logits[1].log_softmax(-1).max().item(), abs=1e-6)
    assert out.logprobs[2] is not None and len(out.logprobs[2].token_ids) == 3


def test_prompt_logprobs_give_each_next_token_its_logprob_rank_and_the_top_k() -> None:
    logits = random_logits(3, seed=5)  # positions 0..2 of a prompt
    next_ids = [4, int(logits[1].argmax()), 17]
    raw = logits.log_softmax(-1)
    out = prompt_logprobs(logits, next_ids, k=2)
    assert len(out) == 3
    for i, lp in enumerate(out):
        t = next_ids[i]
        assert lp.token_ids[0] == t
        assert lp.logprobs[0] == pytest.approx(raw[i, t].item(), abs=1e-6)
        assert lp.ranks[0] == int((raw[i] > raw[i, t]).sum()) + 1
        assert lp.token_ids[1:] == raw[i].topk(2).indices.tolist()
        assert lp.ranks[1:] == [1, 2]
    assert out[1].ranks[0] == 1
    bare = prompt_logprobs(logits, next_ids, k=0)
    assert [lp.token_ids for lp in bare] == [[t] for t in next_ids]
    assert all(math.isfinite(lp.logprobs[0]) for lp in bare)


@pytest.mark.parametrize("batch", range(1, 10))
def test_sampling_parameters_reach_the_kernel_16_byte_aligned(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Triton compiles a kernel variant per alignment of its pointer arguments: the
    # per-row parameters, packed into one tensor per dtype, used to sit at 4-byte offsets
    # for most batch sizes, and each new alignment compiled another variant mid-run.
    import mmengine.sampler as sampler_module

    seen: list[torch.Tensor] = []

    def capture(logits, *params, **kwargs):  # noqa: ANN001, ANN202
        seen.extend(params)
        return torch.zeros(logits.shape[0], dtype=torch.long)

    monkeypatch.setattr(sampler_module, "sample_from_logits", capture)
    rows = [make_row(top_k=3, top_p=0.5, min_p=0.1) for _ in range(batch)]
    sample(torch.randn(batch, V), rows)
    assert len(seen) == 5
    for t in seen:
        assert t.shape == (batch,)
        assert t.data_ptr() % 16 == 0, (batch, t.dtype, t.data_ptr() % 16)
