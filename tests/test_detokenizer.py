"""Incremental detokenizer on the offline byte-level BPE tokenizer fixture."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from mmengine.detokenizer import REPLACEMENT, IncrementalDetokenizer, decode_token
from tests.fixtures.checkpoints import build_tokenizer

# Accented letters, CJK and emoji; the rare ones (🦩 鬱 𝄞 ж ψ) stay split into byte tokens.
MULTIBYTE_TEXTS = [
    "Hello café naïve 中文 日本語 🦩 鬱 𝄞 🚀 done.",
    "🦩🧬🪐 ж ψ ק ع ञ ฿ ∮ ⅞ señor",
    "résumé — 한국어 … 龘 齉 𠜎 ✓",
]


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    build_tokenizer(out, request.param)
    return AutoTokenizer.from_pretrained(str(out))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids one at a time; every delta, then the flush."""
    return [detok.add_tokens([t]) for t in ids] + [detok.flush()]


def test_fixture_text_has_characters_split_across_tokens(tokenizer: Any) -> None:
    # Guards the test below: without split characters it would prove nothing.
    for text in MULTIBYTE_TEXTS:
        pieces = [tokenizer.decode([t]) for t in _ids(tokenizer, text)]
        assert any(REPLACEMENT in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_one_token_at_a_time_never_emits_a_broken_character(tokenizer: Any, text: str) -> None:
    ids = _ids(tokenizer, text)
    deltas = _stream(IncrementalDetokenizer(tokenizer, []), ids)
    assert not any(REPLACEMENT in d for d in deltas), deltas
    assert "".join(deltas) == tokenizer.decode(ids) == text
    # Some token's text was held back until the next one completed its character.
    assert "" in deltas[:-1]


def test_output_after_a_prompt_decodes_in_the_prompt_context(tokenizer: Any) -> None:
    prompt = _ids(tokenizer, "Describe the picture 🦩 please:")
    ids = _ids(tokenizer, " 中文 鬱 𝄞 🧬 ok")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = _stream(detok, ids)
    assert not any(REPLACEMENT in d for d in deltas)
    whole = tokenizer.decode(prompt + ids)
    assert detok.text == "".join(deltas) == whole[len(tokenizer.decode(prompt)) :]


def test_many_tokens_at_once_give_the_same_text(tokenizer: Any) -> None:
    ids = _ids(tokenizer, MULTIBYTE_TEXTS[1])
    detok = IncrementalDetokenizer(tokenizer, [])
    text = detok.add_tokens(ids[:5]) + detok.add_tokens(ids[5:]) + detok.flush()
    assert text == tokenizer.decode(ids)


def test_flush_releases_a_dangling_partial_character(tokenizer: Any) -> None:
    ids = _ids(tokenizer, "ok 🦩")
    # Drop the last byte token: the emoji stays incomplete.
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add_tokens([t]) for t in ids[:-1]]
    assert REPLACEMENT not in "".join(deltas)
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT)
    assert "".join(deltas) + tail == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_decode_token_keeps_special_tokens(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    assert decode_token(tokenizer, eos) == tokenizer.eos_token
    assert decode_token(tokenizer, _ids(tokenizer, "hello")[0]) == tokenizer.decode(
        [_ids(tokenizer, "hello")[0]]
    )
