"""Multimodal oracle: float32 greedy tokens identical to HF for Qwen2-VL, Qwen2.5-VL and
LLaVA — one image, several images, video, mixed batches — in every engine mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmengine import LLM, SamplingParams

torch.set_num_threads(1)

MAX_NEW = 10
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]


def _img(seed: int, h: int = 100, w: int = 140) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _video(seed: int, t: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (t, 56, 84, 3), dtype=np.uint8)


def cases(family: str) -> list[dict]:
    """(content parts, images, videos) per request; videos only for the Qwen families."""
    out = [
        {"parts": ["image", "what is in the picture?"], "images": [_img(1)], "videos": []},
        {
            "parts": ["compare", "image", "with", "image", "and", "image"],
            "images": [_img(2, 60, 90), _img(3, 120, 80), _img(4, 70, 70)],
            "videos": [],
        },
        {"parts": ["a text only question about shapes and colors"], "images": [], "videos": []},
        {"parts": ["image", "again a short one"], "images": [_img(5, 90, 60)], "videos": []},
    ]
    if family != "llava":
        out.append({"parts": ["video", "what moves?"], "images": [], "videos": [_video(6)]})
        out.append(
            {"parts": ["image", "then", "video"], "images": [_img(7)], "videos": [_video(8, 4)]}
        )
    return out


def _messages(parts: list[str]) -> list[dict]:
    content = [
        {"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


_HF: dict[str, tuple[list[str], list[list[int]], list[list[int]]]] = {}


def hf_refs(ckpt: Path, family: str) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Chat texts, HF prompt ids and HF greedy outputs for ``cases(family)``."""
    if family in _HF:
        return _HF[family]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    texts, prompts, outs = [], [], []
    for c in cases(family):
        text = proc.apply_chat_template(_messages(c["parts"]), add_generation_prompt=True)
        kw: dict = {}
        if c["images"]:
            kw["images"] = c["images"]
        if c["videos"]:
            kw["videos"] = c["videos"]
            kw["do_sample_frames"] = False
        inputs = proc(text=[text], return_tensors="pt", **kw)
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        n = inputs["input_ids"].shape[1]
        texts.append(text)
        prompts.append(inputs["input_ids"][0].tolist())
        outs.append(g[0, n:].tolist())
    _HF[family] = (texts, prompts, outs)
    return _HF[family]


def engine_run(ckpt: Path, family: str, **kw) -> tuple[list, dict]:
    texts, _, _ = hf_refs(ckpt, family)
    reqs = []
    for text, c in zip(texts, cases(family)):
        mm = {}
        if c["images"]:
            mm["image"] = c["images"]
        if c["videos"]:
            mm["video"] = c["videos"]
        reqs.append({"prompt": text, "multi_modal_data": mm} if mm else text)
    args = {"dtype": "float32", "device": "cpu", "max_model_len": 1024, "multiprocess": False}
    args.update(kw)
    with LLM(str(ckpt), **args) as llm:
        outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
        stats = llm.stats()
    return outs, stats


@pytest.fixture(params=FAMILIES)
def family_ckpt(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_ckpt")


MODES = {
    "default": {},
    "multiprocess": {"multiprocess": True},
    "chunks_cut_through_images": {"max_num_batched_tokens": 7},
    "tiny_encoder_budget": {"max_num_encoder_tokens": 40, "max_num_batched_tokens": 64},
    "tiny_kv_pool_preempts": {"num_kv_blocks": 12, "block_size": 16, "max_model_len": 176},
    # Async scheduling (the GPU default; tests/test_async_scheduling.py has the rest).
    "async_chunks_cut_through_images": {"async_scheduling": True, "max_num_batched_tokens": 7},
    "async_tiny_kv_pool_preempts": {
        "async_scheduling": True,
        "num_kv_blocks": 12,
        "block_size": 16,
        "max_model_len": 176,
    },
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mm_greedy_tokens_identical_to_hf(family_ckpt: tuple[str, Path], mode: str) -> None:
    family, ckpt = family_ckpt
    _, prompt_ids, refs = hf_refs(ckpt, family)
    outs, stats = engine_run(ckpt, family, **MODES[mode])
    assert [o.prompt_token_ids for o in outs] == prompt_ids  # placeholders expanded as HF
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert stats["kv_blocks_used"] == 0
    if mode.endswith("tiny_kv_pool_preempts"):
        assert stats["num_preemptions"] > 0
    if mode.endswith("chunks_cut_through_images"):
        assert stats["num_steps"] > sum(len(p) for p in prompt_ids) / 7


def test_fixture_images_span_several_chunks(qwen2_vl_ckpt: Path) -> None:
    _, prompt_ids, _ = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    pad = 1029  # <|image_pad|> of the qwen-style fixture tokenizer
    assert max(sum(1 for t in p if t == pad) for p in prompt_ids) > 7


def test_same_image_hits_embedding_and_prefix_caches(qwen2_vl_ckpt: Path) -> None:
    texts, _, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    c = cases("qwen2_vl")[0]
    req = {"prompt": texts[0], "multi_modal_data": {"image": c["images"]}}
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    with LLM(
        str(qwen2_vl_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=1024,
        multiprocess=False,
        block_size=8,
    ) as llm:
        first = llm.generate(req, p, use_tqdm=False)[0]
        s1 = llm.stats()
        second = llm.generate(req, p, use_tqdm=False)[0]
        s2 = llm.stats()
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == refs[0]
    assert s1["encoder_runs"] == 1
    assert s2["encoder_runs"] == s1["encoder_runs"]  # no second encoder run
    assert s2["prefix_cache_hit_tokens"] > s1["prefix_cache_hit_tokens"]
    assert s2["mm_prefix_cache_hit_tokens"] > 0


def test_different_pixels_with_same_placeholders_share_no_kv(qwen2_vl_ckpt: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    texts, prompt_ids, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    other = _img(99)  # same size as case 0's image: identical placeholder token ids
    proc = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt, dtype=torch.float32)
    inputs = proc(text=[texts[0]], images=[other], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt_ids[0]
    ref_other = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[
        0, len(prompt_ids[0]) :
    ].tolist()
    first_pad = prompt_ids[0].index(1029)
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    bs = 4
    with LLM(
        str(qwen2_vl_ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=1024,
        multiprocess=False,
        block_size=bs,
    ) as llm:
        a = llm.generate(
            {"prompt": texts[0], "multi_modal_data": {"image": cases("qwen2_vl")[0]["images"]}},
            p,
            use_tqdm=False,
        )[0]
        before = llm.stats()["prefix_cache_hit_tokens"]
        b = llm.generate(
            {"prompt": texts[0], "multi_modal_data": {"image": other}}, p, use_tqdm=False
        )[0]
        hits = llm.stats()["prefix_cache_hit_tokens"] - before
    assert a.outputs[0].token_ids == refs[0]
    assert b.outputs[0].token_ids == ref_other
    assert hits <= (first_pad // bs) * bs  # only the text blocks before the image


def test_user_uuid_names_the_item_for_caching(qwen2_vl_ckpt: Path) -> None:
    texts, _, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    img = cases("qwen2_vl")[0]["images"]
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    with LLM(
        str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=1024, multiprocess=False
    ) as llm:
        req = {
            "prompt": texts[0],
            "multi_modal_data": {"image": img},
            "multi_modal_uuids": {"image": ["cat-1"]},
        }
        out = llm.generate(req, p, use_tqdm=False)[0]
        llm.generate(req, p, use_tqdm=False)
        assert llm.stats()["encoder_runs"] == 1
    assert out.outputs[0].token_ids == refs[0]


def test_small_embedding_cache_evicts_and_stays_correct(qwen2_5_vl_ckpt: Path) -> None:
    _, _, refs = hf_refs(qwen2_5_vl_ckpt, "qwen2_5_vl")
    outs, stats = engine_run(
        qwen2_5_vl_ckpt, "qwen2_5_vl", mm_embedding_cache_gib=1e-6, enable_prefix_caching=False
    )
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert stats["embedding_cache_hits"] == 0


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad",
    ["truncated_jpeg", "non_image_bytes", "bomb_header", "unreadable_video"],
)
def test_bad_media_fails_with_a_clear_error_and_engine_keeps_working(
    qwen2_vl_ckpt: Path, bad: str
) -> None:
    import struct
    import zlib

    texts, _, refs = hf_refs(qwen2_vl_ckpt, "qwen2_vl")
    if bad == "truncated_jpeg":
        mm = {"image": _jpeg(_img(1))[:200]}
    elif bad == "non_image_bytes":
        mm = {"image": b"this is not an image at all" * 10}
    elif bad == "bomb_header":
        ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        mm = {
            "image": b"\x89PNG\r\n\x1a\n"
            + struct.pack(">I", 13)
            + chunk
            + struct.pack(">I", zlib.crc32(chunk))
        }
    else:
        mm = {"video": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 300}
    good = {"prompt": texts[0], "multi_modal_data": {"image": cases("qwen2_vl")[0]["images"]}}
    text = texts[0] if "image" in mm else texts[4]
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    with LLM(
        str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=1024, multiprocess=False
    ) as llm:
        with pytest.raises(ValueError) as err:
            llm.generate({"prompt": text, "multi_modal_data": mm}, p, use_tqdm=False)
        msg = str(err.value)
        assert "Traceback" not in msg and "/" not in msg.split(":", 1)[-1][:0]
        assert len(msg) < 300
        ok = llm.generate(good, p, use_tqdm=False)[0]
        assert ok.outputs[0].token_ids == refs[0]
        assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers5_layout_checkpoints_match_hf(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.fixtures.checkpoints import build_vlm_checkpoint

    ckpt = build_vlm_checkpoint(family, tmp_path / family, layout="v5")
    proc = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    c = cases(family)[0]
    text = proc.apply_chat_template(_messages(c["parts"]), add_generation_prompt=True)
    inputs = proc(text=[text], images=c["images"], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, n:].tolist()
    with LLM(
        str(ckpt), dtype="float32", device="cpu", max_model_len=1024, multiprocess=False
    ) as llm:
        out = llm.generate(
            {"prompt": text, "multi_modal_data": {"image": c["images"]}},
            SamplingParams(temperature=0, max_tokens=MAX_NEW),
            use_tqdm=False,
        )[0]
    assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_profile_encoder_batch_fills_the_budget(family: str, request) -> None:
    from mmengine.config import EngineConfig
    from mmengine.engine_core import EngineCore
    from mmengine.kv_memory import dummy_encoder_items

    ckpt = request.getfixturevalue(f"{family}_ckpt")
    core = EngineCore(
        EngineConfig(model=str(ckpt), dtype="float32", device="cpu", max_model_len=256)
    )
    items = dummy_encoder_items(core.runner, 300)
    outs = core.runner.encoder_runner.encoder.encode(items)
    rows = sum(o.shape[0] for o in outs)
    assert 250 <= rows <= 300  # close to the per-step budget, never above it
