"""Proves the offline checkpoint fixtures are what other tests assume they are.

HF transformers loads every folder with no missing or unused tensors, generates, and is
sensitive to the things engine tests claim to check (positions, M-RoPE, pixels).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

from tests.fixtures.checkpoints import (
    build_text_checkpoint,
    build_vlm_checkpoint,
    never_emit_ids,
    special_token_ids,
)
from tests.fixtures.hf_reference import (
    assert_params_come_from_files,
    load_causal_lm,
    load_vlm,
    saved_tensors,
    sigma_shift,
    smooth_image,
    vlm_image_inputs,
)
from tests.fixtures.layout_v5 import v5_weight_name
from tests.fixtures.network_guard import NetworkBlockedError, NetworkGuard

PROMPTS = [
    "Hello world, what is shown here?",
    "Describe the picture please.",
    "café 中文 and 🚀 words",
    "user: tell me a story about dogs",
    "1 2 3 4 5",
]


@torch.no_grad()
def _last_logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits[0, -1]


def test_text_checkpoint_loads_every_tensor_and_generates_varied_tokens(text_ckpt: Path) -> None:
    model = load_causal_lm(text_ckpt)
    assert_params_come_from_files(model, text_ckpt)
    tok = AutoTokenizer.from_pretrained(text_ckpt)
    assert model.config.vocab_size > len(tok)
    assert model.config.vocab_size % 64 == 0
    never = set(never_emit_ids(text_ckpt))
    distinct = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        assert len(new) == 16
        assert max(new) < len(tok), "padded vocab rows must never win greedy decoding"
        assert not set(new) & never, "vision placeholders must never be generated"
        distinct.append(len(set(new)))
    # A random model that loops on one token would make every engine "match".
    assert min(distinct) >= 4 and sorted(distinct)[len(distinct) // 2] >= 8, distinct


def test_text_config_is_flat_hub_layout(text_ckpt: Path) -> None:
    cfg = json.loads((text_ckpt / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and "rope_parameters" not in cfg
    assert cfg["torch_dtype"] == "float32"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    gen = json.loads((text_ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"]


def test_tied_checkpoint_stores_no_lm_head_and_matches_explicit_copy(
    qwen3_ckpt: Path, tmp_path: Path
) -> None:
    saved = saved_tensors(qwen3_ckpt)
    assert "lm_head.weight" not in saved
    # The same weights with an explicit lm_head = embedding, untied, must agree exactly.
    untied = tmp_path / "untied"
    shutil.copytree(qwen3_ckpt, untied)
    saved["lm_head.weight"] = saved["model.embed_tokens.weight"].clone()
    save_file(saved, str(untied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((untied / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([[5, 77, 300, 12, 900]])
    tied_model, untied_model = load_causal_lm(qwen3_ckpt), load_causal_lm(untied)
    assert tied_model.lm_head.weight.data_ptr() == tied_model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_last_logits(tied_model, ids), _last_logits(untied_model, ids))


def test_untied_qwen3_and_tied_llama_can_be_requested(tmp_path: Path) -> None:
    untied = build_text_checkpoint("qwen3", tmp_path / "q3", tie_word_embeddings=False)
    assert "lm_head.weight" in saved_tensors(untied)
    tied = build_text_checkpoint("llama", tmp_path / "ll", tie_word_embeddings=True)
    assert "lm_head.weight" not in saved_tensors(tied)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharded_checkpoint_has_index_and_same_logits(family: str, tmp_path: Path) -> None:
    plain = build_text_checkpoint(family, tmp_path / "plain")
    sharded = build_text_checkpoint(family, tmp_path / "sharded", num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3 and all((sharded / f).is_file() for f in files)
    assert not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(saved_tensors(plain))
    ids = torch.tensor([[3, 14, 159, 26, 535]])
    a = _last_logits(load_causal_lm(plain), ids)
    assert torch.equal(a, _last_logits(load_causal_lm(sharded), ids))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_v5_config_layout_loads_with_identical_logits(family: str, tmp_path: Path) -> None:
    hub = build_text_checkpoint(family, tmp_path / "hub")
    v5 = build_text_checkpoint(family, tmp_path / "v5", layout="v5")
    cfg = json.loads((v5 / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg
    ids = torch.tensor([[3, 14, 159, 26, 535, 89, 79]])
    a = _last_logits(load_causal_lm(hub), ids)
    assert torch.equal(a, _last_logits(load_causal_lm(v5), ids))


def test_builders_are_fast_and_import_neither_pytest_nor_transformers(tmp_path: Path) -> None:
    # examples/demo.py imports the builder outside pytest; text builds need no transformers.
    code = (
        "import sys, time; from tests.fixtures.checkpoints import build_text_checkpoint as b\n"
        f"t = time.perf_counter(); b('qwen3', {str(tmp_path / 'q')!r})\n"
        "assert time.perf_counter() - t < 2.0, time.perf_counter() - t\n"
        "assert 'pytest' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
    for family in ("qwen2_vl", "qwen2_5_vl", "llava"):
        start = time.perf_counter()
        build_vlm_checkpoint(family, tmp_path / family)
        assert time.perf_counter() - start < 2.0


def test_same_seed_rebuilds_identical_weights_and_new_seed_differs(tmp_path: Path) -> None:
    a = saved_tensors(build_text_checkpoint("qwen2", tmp_path / "a"))
    b = saved_tensors(build_text_checkpoint("qwen2", tmp_path / "b"))
    c = saved_tensors(build_text_checkpoint("qwen2", tmp_path / "c", seed=1))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])


def test_text_logits_are_sensitive_to_positions(text_ckpt: Path) -> None:
    """A gap in position ids moves logits clearly; a uniform shift does not (RoPE is
    relative), so engine tests must use gaps or per-token errors to catch position bugs."""
    model = load_causal_lm(text_ckpt)
    ids = torch.tensor([[11, 250, 37, 480, 901, 66, 702, 45]])
    pos = torch.arange(ids.shape[1])[None]
    base = _last_logits(model, ids, position_ids=pos)
    gap = pos.clone()
    gap[0, -3:] += 3
    moved = (_last_logits(model, ids, position_ids=gap) - base).abs().max()
    shifted = (_last_logits(model, ids, position_ids=pos + 7) - base).abs().max()
    assert moved > 0.5 * base.std(), (moved, base.std())
    assert shifted < 1e-3 * base.std()


def test_tokenizer_round_trips_multibyte_text_split_across_tokens(text_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(text_ckpt)
    text = "Hello café naïve 中文 日本語 🦩 鬱 𝄞 🚀 done."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    # Some character must span several tokens, each not valid UTF-8 on its own: the
    # incremental detokenizer tests need such partial sequences.
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), pieces
    assert 1000 <= len(tok) <= 2100


def test_special_tokens_sit_at_the_end_of_the_vocab(text_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(text_ckpt)
    specials = special_token_ids(text_ckpt)
    assert sorted(specials.values()) == list(range(len(tok) - len(specials), len(tok)))
    for text, idx in specials.items():
        assert tok.convert_tokens_to_ids(text) == idx
        assert tok(text, add_special_tokens=False).input_ids == [idx]


def test_qwen_chat_template_renders_chatml_with_media_parts(qwen2_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(qwen2_ckpt)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "What is it?"},
                {"type": "video"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "More."}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nMore.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama_tokenizer_adds_bos_and_template_is_llava_style(llama_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama_ckpt)
    ids = tok("hi there").input_ids
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert tok.eos_token == "</s>"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "And?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "USER: <image>\nWhat? ASSISTANT: A dog.</s> USER: And? ASSISTANT:"


def test_socket_guard_refuses_non_loopback_before_sending(socket_guard: NetworkGuard) -> None:
    for make in (
        lambda: socket.create_connection(("10.255.255.1", 9), timeout=0.2),
        lambda: socket.socket().connect(("10.255.255.1", 9)),
        lambda: socket.socket().connect_ex(("10.255.255.1", 9)),
        lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 9)),
        lambda: socket.create_connection(("example.com", 80), timeout=0.2),
    ):
        with pytest.raises(NetworkBlockedError):
            make()
    assert len(socket_guard.take_violations()) == 5


def test_socket_guard_allows_loopback_and_unix_sockets(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=2):
        conn, _ = server.accept()
        conn.close()
    server.close()
    unix = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "s.sock")
    unix.bind(path)
    unix.listen(1)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    unix.close()


# --- vision-language checkpoints ---------------------------------------------------

VLM_FIXTURES = ["qwen2_vl_ckpt", "qwen2_5_vl_ckpt", "llava_ckpt"]


@pytest.mark.parametrize("fixture", VLM_FIXTURES)
def test_vlm_checkpoint_loads_every_tensor_and_generates_from_an_image(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    ckpt: Path = request.getfixturevalue(fixture)
    model = load_vlm(ckpt)
    assert_params_come_from_files(model, ckpt)
    inputs = vlm_image_inputs(ckpt, smooth_image())
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(set(new)) >= 4, new
    assert not set(new) & set(never_emit_ids(ckpt))


def _hand_nested_config(hub: dict) -> PretrainedConfig:
    """The transformers-5 config we derive by hand from a flat hub config.json."""
    if hub["model_type"] == "llava":  # the hub layout of llava-1.5 is nested already
        return LlavaConfig(**{k: v for k, v in hub.items() if k != "architectures"})
    assert "text_config" not in hub
    top = {"architectures", "model_type", "vision_config", "rope_scaling", "rope_theta"}
    top |= {"tie_word_embeddings", "image_token_id", "video_token_id"}
    top |= {"vision_start_token_id", "vision_end_token_id"}
    text = {k: v for k, v in hub.items() if k not in top}
    rope = {"rope_type": "default", "rope_theta": hub["rope_theta"]}
    if hub["rope_scaling"] is not None:
        assert hub["rope_scaling"]["type"] == "mrope"
        rope["mrope_section"] = hub["rope_scaling"]["mrope_section"]
    if "vision_config" not in hub:
        return AutoConfig.for_model(
            hub["model_type"],
            **text,
            rope_parameters=rope,
            tie_word_embeddings=hub["tie_word_embeddings"],
        )
    cls = Qwen2VLConfig if hub["model_type"] == "qwen2_vl" else Qwen2_5_VLConfig
    extra = {k: hub[k] for k in top & hub.keys() if k.endswith("_id") or k.startswith("tie")}
    return cls(
        text_config={**text, "rope_parameters": rope}, vision_config=hub["vision_config"], **extra
    )


@pytest.mark.parametrize("fixture", ["llama_ckpt", "qwen2_ckpt", "qwen3_ckpt", *VLM_FIXTURES])
def test_folder_equals_in_memory_model_from_hand_config_and_renamed_tensors(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """from_pretrained(folder) is bit-identical to a model built in memory from a nested
    config derived by hand and given the saved tensors under transformers-5 names: the
    flat hub config (rope theta, M-RoPE sections) and the hub weight names both read
    as intended."""
    ckpt: Path = request.getfixturevalue(fixture)
    hub = json.loads((ckpt / "config.json").read_text())
    is_vlm = "vision_config" in hub
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    in_memory = auto.from_config(_hand_nested_config(hub)).eval()
    tensors = {v5_weight_name(hub["model_type"], k): v for k, v in saved_tensors(ckpt).items()}
    missing, unexpected = in_memory.load_state_dict(tensors, strict=False)
    # A tied lm_head has no tensor of its own; it shares the embedding's.
    assert not unexpected and set(missing) <= (
        {"lm_head.weight"} if hub["tie_word_embeddings"] else set()
    )
    if is_vlm:
        inputs = vlm_image_inputs(ckpt, smooth_image())
    else:
        inputs = {"input_ids": torch.tensor([[3, 14, 159, 26, 535, 89, 79]])}
    loader = load_vlm if is_vlm else load_causal_lm
    with torch.no_grad():
        assert torch.equal(loader(ckpt)(**inputs).logits, in_memory(**inputs).logits)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_v5_layout_vlm_loads_with_identical_logits(family: str, tmp_path: Path) -> None:
    hub = build_vlm_checkpoint(family, tmp_path / "hub")
    v5 = build_vlm_checkpoint(family, tmp_path / "v5", layout="v5")
    assert "text_config" in json.loads((v5 / "config.json").read_text())
    assert all(k.startswith(("model.", "lm_head.")) for k in saved_tensors(v5))
    inputs = vlm_image_inputs(hub, smooth_image())
    with torch.no_grad():
        assert torch.equal(load_vlm(hub)(**inputs).logits, load_vlm(v5)(**inputs).logits)


@pytest.mark.parametrize("fixture", ["qwen2_vl_ckpt", "qwen2_5_vl_ckpt"])
def test_qwen_vl_processor_files_are_standalone_and_keep_images_small(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    ckpt: Path = request.getfixturevalue(fixture)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        cfg = json.loads((ckpt / name).read_text())
        assert cfg["max_pixels"] == cfg["size"]["longest_edge"] <= 28 * 28 * 64
        assert cfg["min_pixels"] == cfg["size"]["shortest_edge"]
    fast = AutoProcessor.from_pretrained(ckpt, use_fast=True)
    slow = AutoProcessor.from_pretrained(ckpt, use_fast=False)
    assert "Pil" not in type(fast.image_processor).__name__
    assert type(slow.image_processor) is not type(fast.image_processor)
    big = Image.new("RGB", (1500, 1000), (200, 30, 30))
    grid = fast.image_processor(images=[big], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 <= 64  # merged tokens within max_pixels


def test_qwen2_vl_generates_from_video_frames(qwen2_vl_ckpt: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    proc = AutoProcessor.from_pretrained(qwen2_vl_ckpt, use_fast=True)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hm?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|vision_start|><|video_pad|><|vision_end|>" in prompt
    inputs = proc(text=[prompt], videos=[frames], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    out = load_vlm(qwen2_vl_ckpt).generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8


@pytest.mark.parametrize("fixture", ["qwen2_vl_ckpt", "qwen2_5_vl_ckpt"])
def test_qwen_vl_logits_are_sensitive_to_mrope_positions(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """1-D instead of 3-D positions, and swapped height / width, both move logits."""
    ckpt: Path = request.getfixturevalue(fixture)
    model = load_vlm(ckpt)
    inputs = vlm_image_inputs(ckpt, smooth_image())
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        base = model(**inputs).logits
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        assert torch.equal(model(**inputs, position_ids=pos).logits, base)
        flat = model(**inputs, position_ids=torch.arange(n)[None]).logits
        swapped = model(**inputs, position_ids=pos[[0, 2, 1]]).logits
    assert sigma_shift(base, flat) > 0.3
    assert sigma_shift(base, swapped) > 0.05


@pytest.mark.parametrize("fixture", VLM_FIXTURES)
def test_vlm_logits_are_sensitive_to_a_six_pixel_image_shift(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    ckpt: Path = request.getfixturevalue(fixture)
    model = load_vlm(ckpt)
    with torch.no_grad():
        base = model(**vlm_image_inputs(ckpt, smooth_image())).logits
        moved = model(**vlm_image_inputs(ckpt, smooth_image(shift_px=6))).logits
    assert sigma_shift(base, moved) > 0.1


def test_qwen2_5_vl_uses_both_window_and_full_attention_blocks(qwen2_5_vl_ckpt: Path) -> None:
    model = load_vlm(qwen2_5_vl_ckpt)
    visual = model.model.visual
    depth = len(visual.blocks)
    assert 0 < len(visual.fullatt_block_indexes) < depth
    inputs = vlm_image_inputs(qwen2_5_vl_ckpt, smooth_image())
    with torch.no_grad():
        base = model(**inputs).logits
        visual.fullatt_block_indexes = list(range(depth))  # windows off
        all_full = model(**inputs).logits
    # The test image spans several windows, so windowing must change the result.
    assert sigma_shift(base, all_full) > 0.05
