"""SamplingParams: defaults, normalization, range checks and per-child seeds."""

from __future__ import annotations

import pytest

from mmengine.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    SamplingParams,
)


def test_defaults_follow_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert not p.greedy
    assert SamplingParams(temperature=0.0).greedy


def test_inputs_are_normalized() -> None:
    p = SamplingParams(stop="###", top_k=-1, stop_token_ids=None)  # type: ignore[arg-type]
    assert p.stop == ["###"] and p.top_k == 0 and p.stop_token_ids == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", 100.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("presence_penalty", -2.01),
        ("presence_penalty", 2.01),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", 2.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.01),
        ("max_tokens", 0),
        ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("seed", 1.5),
        ("seed", "7"),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("stop", [""]),
        ("stop", ["x" * (MAX_STOP_STRING_LEN + 1)]),
        ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
        ("stop_token_ids", [3, -1]),
    ],
)
def test_out_of_range_parameter_raises_naming_it(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"invalid sampling parameter '{name}'"):
        SamplingParams(**{name: value})  # type: ignore[arg-type]


def test_min_tokens_above_max_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="'min_tokens': must not exceed max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": MAX_N},
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1e-9},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 10.0},
        {"max_tokens": None},
        {"logprobs": 0, "prompt_logprobs": MAX_LOGPROBS},
        {"stop": ["x" * MAX_STOP_STRING_LEN] * MAX_STOP_STRINGS},
        {"seed": -5},
    ],
)
def test_bounds_themselves_are_accepted(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_for_child_offsets_the_seed_and_sets_n_to_one() -> None:
    parent = SamplingParams(n=3, seed=10, temperature=0.7, stop=["x"])
    children = [parent.for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.temperature == 0.7 and c.stop == ["x"] for c in children)
    assert parent.n == 3 and parent.seed == 10  # the parent is untouched


def test_for_child_keeps_no_seed_unseeded() -> None:
    assert SamplingParams(n=2).for_child(1).seed is None
