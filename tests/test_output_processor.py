"""OutputProcessor: stop strings, stop-token text, n > 1 gathering, logprob conversion."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from mmengine.messages import EngineCoreOutput, TokenLogprobs
from mmengine.output_processor import OutputProcessor, ProcessedOutputs
from mmengine.outputs import Logprob, RequestOutput
from mmengine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import build_tokenizer

TEXT = "the cat sat on the mat."  # tokens: the| cat| s|at| on| the| m|at|.


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out, "qwen")
    return AutoTokenizer.from_pretrained(str(out))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _processor(
    tokenizer: Any, params: SamplingParams, core_ids: tuple[str, ...] = ("r",)
) -> OutputProcessor:
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", "prompt", _ids(tokenizer, "Say something:"), params, list(core_ids))
    return proc


def _feed(
    proc: OutputProcessor,
    ids: list[int],
    core_id: str = "r",
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
) -> list[ProcessedOutputs]:
    """One core output per token; the last one carries the finish reason."""
    results = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        out = EngineCoreOutput(
            core_id,
            [t],
            finish_reason=finish_reason if last else None,
            stop_reason=stop_reason if last else None,
        )
        results.append(proc.process([out]))
    return results


def _last_output(results: list[ProcessedOutputs]) -> RequestOutput:
    return [r for r in results if r.updated][-1].updated[-1]


# ---- stop strings ---------------------------------------------------------------------


def test_stop_string_spanning_two_tokens_is_cut_and_the_core_request_aborted(
    tokenizer: Any,
) -> None:
    ids = _ids(tokenizer, TEXT)
    assert all("sat" not in tokenizer.decode([t]) for t in ids)  # "sat" spans " s" + "at"
    proc = _processor(tokenizer, SamplingParams(stop=["sat"]))
    results = _feed(proc, ids)
    hit = results[3]  # the "at" token completes the stop string
    assert hit.abort_core_ids == ["r"]
    (out,) = hit.updated
    assert out.finished
    comp = out.outputs[0]
    assert comp.text == "the cat "
    assert (comp.finish_reason, comp.stop_reason) == ("stop", "sat")
    assert comp.token_ids == ids[:4]
    # Tokens the core produced before the abort landed are dropped.
    assert all(not r.updated and not r.abort_core_ids for r in results[4:])
    assert not proc.has_unfinished()


def test_stop_string_kept_with_include_stop_str_in_output(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams(stop=["sat"], include_stop_str_in_output=True))
    out = _last_output(_feed(proc, _ids(tokenizer, TEXT)))
    assert out.outputs[0].text == "the cat sat"


def test_stop_string_inside_a_token_cuts_the_rest_of_that_token(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams(stop=["on t"]))
    out = _last_output(_feed(proc, _ids(tokenizer, TEXT)))
    assert out.outputs[0].text == "the cat sat "  # "he" of " the" is dropped too


def test_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams(stop=["on", "mat", "t o"]))
    # " on" completes both "on" and "t o": the earlier match in the text wins.
    ids = _ids(tokenizer, TEXT)
    res = proc.process([EngineCoreOutput("r", ids)])
    comp = res.updated[0].outputs[0]
    assert (comp.text, comp.stop_reason) == ("the cat sa", "t o")
    assert res.abort_core_ids == ["r"]


def test_stop_strings_are_ignored_before_min_tokens(tokenizer: Any) -> None:
    # "at" ends tokens 2 and 4; only the one in token 8 counts with min_tokens=5.
    proc = _processor(tokenizer, SamplingParams(stop=["at"], min_tokens=5))
    out = _last_output(_feed(proc, _ids(tokenizer, TEXT)))
    assert out.outputs[0].text == "the cat sat on the m"
    assert out.outputs[0].token_ids == _ids(tokenizer, TEXT)[:8]


def test_stop_string_seen_before_min_tokens_is_not_matched_later(tokenizer: Any) -> None:
    # Same as above plus a longer stop string that never occurs: the search window
    # widens to 3 characters back, and finds the "at" of "sat" (token 4) at token 5.
    proc = _processor(tokenizer, SamplingParams(stop=["at", "zzzz"], min_tokens=5))
    out = _last_output(_feed(proc, _ids(tokenizer, TEXT)))
    assert out.outputs[0].text == "the cat sat on the m"


# ---- stop tokens and other finishes ---------------------------------------------------


def test_eos_text_is_not_in_the_output(tokenizer: Any) -> None:
    params = SamplingParams(skip_special_tokens=False)
    ids = _ids(tokenizer, "hello world") + [tokenizer.eos_token_id]
    proc = _processor(tokenizer, params)
    comp = _last_output(_feed(proc, ids, finish_reason="stop")).outputs[0]
    assert comp.text == "hello world"
    assert comp.token_ids == ids  # the id stays
    assert (comp.finish_reason, comp.stop_reason) == ("stop", None)
    # Control: the same tokens without a stop finish do show the EOS text.
    proc = _processor(tokenizer, params)
    comp = _last_output(_feed(proc, ids, finish_reason="length")).outputs[0]
    assert comp.text == "hello world" + tokenizer.eos_token


def test_stop_token_text_is_not_in_the_output(tokenizer: Any) -> None:
    ids = _ids(tokenizer, TEXT)
    proc = _processor(tokenizer, SamplingParams(stop_token_ids=[ids[-1]]))
    comp = _last_output(_feed(proc, ids, finish_reason="stop", stop_reason=ids[-1])).outputs[0]
    assert comp.text == "the cat sat on the mat"
    assert (comp.finish_reason, comp.stop_reason) == ("stop", ids[-1])


def test_stop_token_text_kept_with_include_stop_str_in_output(tokenizer: Any) -> None:
    ids = _ids(tokenizer, TEXT)
    params = SamplingParams(stop_token_ids=[ids[-1]], include_stop_str_in_output=True)
    proc = _processor(tokenizer, params)
    comp = _last_output(_feed(proc, ids, finish_reason="stop", stop_reason=ids[-1])).outputs[0]
    assert comp.text == TEXT


def test_length_finish_keeps_the_last_token_text(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams())
    out = _last_output(_feed(proc, _ids(tokenizer, TEXT), finish_reason="length"))
    assert out.finished and out.outputs[0].text == TEXT
    assert out.outputs[0].finish_reason == "length"
    assert not proc.has_unfinished()


# ---- n > 1 ----------------------------------------------------------------------------


def test_n_completions_are_gathered_in_index_order(tokenizer: Any) -> None:
    texts = ["the cat", "a red dog", "hello world"]
    proc = _processor(tokenizer, SamplingParams(n=3), core_ids=("r-0", "r-1", "r-2"))
    # The core finishes them in reverse order.
    for i in (2, 1):
        out = _last_output(_feed(proc, _ids(tokenizer, texts[i]), f"r-{i}", "length"))
        assert not out.finished
    assert proc.has_unfinished()
    out = _last_output(_feed(proc, _ids(tokenizer, texts[0]), "r-0", "length"))
    assert out.finished and not proc.has_unfinished()
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.text for c in out.outputs] == texts


def test_stop_string_aborts_only_the_completion_that_matched(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams(n=2, stop=["dog"]), core_ids=("r-0", "r-1"))
    res = proc.process(
        [
            EngineCoreOutput("r-0", _ids(tokenizer, "the cat")),
            EngineCoreOutput("r-1", _ids(tokenizer, "a red dog")),
        ]
    )
    assert res.abort_core_ids == ["r-1"]
    (out,) = res.updated
    assert not out.finished
    assert [(c.text, c.finish_reason) for c in out.outputs] == [
        ("the cat", None),
        ("a red ", "stop"),
    ]
    assert proc.abort_request("r") == ["r-0"]  # only the running one needs aborting
    assert not proc.has_unfinished()


# ---- logprobs -------------------------------------------------------------------------


def test_logprobs_become_logprob_dicts_with_decoded_tokens(tokenizer: Any) -> None:
    a, b = _ids(tokenizer, "hello world")
    proc = _processor(tokenizer, SamplingParams(logprobs=2))
    steps = [
        TokenLogprobs([a, a, b], [-0.25, -0.25, -1.5], [1, 1, 2]),
        TokenLogprobs([b, a, b], [-2.0, -0.5, -2.0], [2, 1, 2]),
    ]
    proc.process([EngineCoreOutput("r", [a], new_logprobs=[steps[0]])])
    res = proc.process(
        [EngineCoreOutput("r", [b], new_logprobs=[steps[1]], finish_reason="length")]
    )
    comp = res.updated[0].outputs[0]
    assert comp.logprobs == [
        {a: Logprob(-0.25, 1, "hello"), b: Logprob(-1.5, 2, " world")},
        {b: Logprob(-2.0, 2, " world"), a: Logprob(-0.5, 1, "hello")},
    ]
    assert comp.cumulative_logprob == pytest.approx(-2.25)


def test_no_logprobs_requested_gives_none(tokenizer: Any) -> None:
    proc = _processor(tokenizer, SamplingParams())
    out = _last_output(_feed(proc, _ids(tokenizer, "hello"), finish_reason="length"))
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None


def test_prompt_logprobs_are_converted_once_for_the_prompt(tokenizer: Any) -> None:
    a, b = _ids(tokenizer, "hello world")
    proc = _processor(tokenizer, SamplingParams(n=2, prompt_logprobs=1), core_ids=("r-0", "r-1"))
    chunk = [None, TokenLogprobs([b, a], [-3.0, -0.1], [4, 1])]
    res = proc.process(
        [
            EngineCoreOutput("r-0", [], prompt_logprobs=chunk),
            EngineCoreOutput("r-1", [], prompt_logprobs=chunk),  # the same prompt again
        ]
    )
    assert res.updated[0].prompt_logprobs == [
        None,
        {b: Logprob(-3.0, 4, " world"), a: Logprob(-0.1, 1, "hello")},
    ]
