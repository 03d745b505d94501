"""Checkpoint loading: both config layouts, shards, tied embeddings, padded vocab, dtypes,
and hub ids resolved from the local HF cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from mmengine.model_loader import load_model_spec, resolve_model_path
from tests.fixtures.checkpoints import build_text_checkpoint

torch.set_num_threads(1)

PROMPTS = ["the red circle moves", "a blue square", "東京 café résumé"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def run(path: Path | str, **kw) -> list[list[int]]:
    with LLM(
        str(path),
        dtype=kw.pop("dtype", "float32"),
        device="cpu",
        max_model_len=128,
        multiprocess=False,
        **kw,
    ) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_sharded_and_v5_layouts_give_identical_tokens(family: str, tmp_path: Path) -> None:
    base = build_text_checkpoint(family, tmp_path / "base")
    sharded = build_text_checkpoint(family, tmp_path / "sharded", num_shards=3)
    v5 = build_text_checkpoint(family, tmp_path / "v5", layout="v5")
    assert (sharded / "model.safetensors.index.json").is_file()
    cfg = json.loads((v5 / "config.json").read_text())
    assert "rope_parameters" in cfg or "text_config" in cfg  # really the nested layout
    ref = run(base)
    assert run(sharded) == ref
    assert run(v5) == ref
    assert load_model_spec(v5).rope_theta == load_model_spec(base).rope_theta


def test_tied_embeddings_store_no_lm_head_and_match_hf(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = build_text_checkpoint("llama", tmp_path / "tied", tie_word_embeddings=True)
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    spec = load_model_spec(ck)
    assert spec.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(ck)
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, eos_token_id=None)
    got = run(ck)[0]
    assert got == ref[0, ids.shape[1] :].tolist()


def test_vocab_is_padded_above_the_tokenizer(qwen2_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    spec = load_model_spec(qwen2_ckpt)
    assert spec.vocab_size > len(AutoTokenizer.from_pretrained(qwen2_ckpt))


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ck = build_text_checkpoint("qwen2", tmp_path / "broken")
    tensors = load_file(str(ck / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(ck / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        run(ck)


def test_bf16_and_auto_dtype(qwen2_ckpt: Path) -> None:
    from mmengine.config import EngineConfig
    from mmengine.engine_core import EngineCore

    core = EngineCore(
        EngineConfig(model=str(qwen2_ckpt), dtype="auto", device="cpu", max_model_len=64)
    )
    assert core.dtype == torch.float32  # the fixture's config says float32
    assert all(len(t) == 10 for t in run(qwen2_ckpt, dtype="bfloat16"))


def test_hub_id_resolves_from_the_local_cache(
    qwen2_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    # Lay the checkpoint out as the HF cache does: models--org--name/snapshots/<rev>/...
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-qwen2" / "snapshots" / "0123abc"
    shutil.copytree(qwen2_ckpt, snap)
    (cache / "models--tiny-org--tiny-qwen2" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen2" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_model_path("tiny-org/tiny-qwen2") == snap
    with pytest.raises(FileNotFoundError, match="not-there"):
        resolve_model_path("tiny-org/not-there")


@pytest.mark.parametrize(
    ("fields", "window"),
    [
        ({"sliding_window": 64}, 64),  # Mistral-7B-v0.1 style: the window is always on
        ({"sliding_window": None}, None),  # Mistral v0.2+
        ({"sliding_window": 64, "use_sliding_window": False}, None),  # Qwen2 style, off
        ({"sliding_window": 64, "use_sliding_window": True}, 64),
        ({"sliding_window": 64, "layer_types": ["full_attention"] * 2}, None),
        ({"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}, 64),
    ],
)
def test_sliding_window_models_get_their_context_capped_at_the_window(
    fields: dict, window: int | None, llama_ckpt: Path, tmp_path: Path, caplog
) -> None:
    """Sliding-window attention is not implemented: within the window it equals full
    attention, so the engine caps max_model_len there (with a warning) instead of
    silently disagreeing with HF on longer contexts."""
    path = tmp_path / "model"
    shutil.copytree(llama_ckpt, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model_spec(path).sliding_window == window
    with (
        caplog.at_level("WARNING"),
        LLM(str(path), dtype="float32", device="cpu", max_model_len=128, multiprocess=False) as llm,
    ):
        assert llm.max_model_len == (window or 128)
        assert ("sliding-window attention (window 64)" in caplog.text) == (window is not None)
        if window:
            with pytest.raises(ValueError, match="max_model_len is 64"):
                llm.generate([{"prompt_token_ids": list(range(10, 80))}], GREEDY, use_tqdm=False)
