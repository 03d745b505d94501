"""Start-up kernel warm-up (mmengine/warmup.py): which attention batches it runs, and that
running them leaves the KV cache alone. Whether it reaches every variant a step can use is
checked on a GPU: tests/test_gpu_engine.py::test_nothing_compiles_after_start_up."""

from __future__ import annotations

import pytest
import torch

from mmengine.warmup import attention_shapes, run_attention_warmup

torch.set_num_threads(1)

LIMITS = dict(max_num_batched_tokens=512, max_num_seqs=48, max_model_len=300)


@pytest.mark.parametrize("queries_per_kv", [1, 2, 7, 8])
@pytest.mark.parametrize("decodes_in_graphs", [True, False])
def test_warmup_batches_stay_within_the_engine_limits(
    queries_per_kv: int, decodes_in_graphs: bool
) -> None:
    batches = attention_shapes(
        queries_per_kv=queries_per_kv, decodes_in_graphs=decodes_in_graphs, **LIMITS
    )
    assert batches
    for b in batches:
        assert b.num_tokens <= LIMITS["max_num_batched_tokens"]
        assert len(b.query_lens) <= LIMITS["max_num_seqs"]
        assert b.max_seq_len <= LIMITS["max_model_len"]
        assert min(b.query_lens) >= 1


def test_warmup_runs_pure_decodes_only_where_graphs_do_not():
    def decodes(in_graphs: bool) -> list:
        shapes = attention_shapes(queries_per_kv=8, decodes_in_graphs=in_graphs, **LIMITS)
        return [b for b in shapes if max(b.query_lens) == 1]

    assert decodes(True) == []
    eager = decodes(False)
    # Every power-of-two batch size, up to the largest; contexts from 1 to the longest.
    assert {len(b.query_lens) for b in eager} == {1, 2, 4, 8, 16, 32, 48}
    assert {b.context_len for b in eager} >= {1, 2, 128, 256, 299}


def test_warmup_covers_each_tile_boundary_alone_and_with_decodes() -> None:
    # 8 query heads per KV head: 16-, 64-, 128- and 256-row tiles hold 2, 8, 16 and 32
    # tokens of a chunk; both sides of each boundary, with and without decodes beside.
    shapes = attention_shapes(queries_per_kv=8, decodes_in_graphs=True, **LIMITS)
    longest = {max(b.query_lens) for b in shapes}
    assert {2, 3, 8, 9, 16, 17, 32, 33, 299} <= longest
    for q in (2, 8, 17, 33):
        alone = [b for b in shapes if b.query_lens == (q,)]
        riding = [b for b in shapes if b.query_lens[0] == q and len(b.query_lens) > 1]
        assert alone and riding, q


def test_warmup_attention_writes_nothing_to_the_kv_cache() -> None:
    torch.manual_seed(0)
    key_cache = torch.randn(8, 16, 2, 32)
    value_cache = torch.randn(8, 16, 2, 32)
    before = (key_cache.clone(), value_cache.clone())
    batches = attention_shapes(
        queries_per_kv=2,
        max_num_batched_tokens=40,
        max_num_seqs=4,
        max_model_len=64,
        decodes_in_graphs=False,
    )
    run_attention_warmup(
        batches, key_cache=key_cache, value_cache=value_cache, num_q_heads=4,
        scale=32**-0.5, dtype=torch.float32,
    )  # fmt: skip
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


def test_kv_cache_and_graph_buffers_are_inference_tensors() -> None:
    # torch.compile guards on whether a tensor is an inference tensor: steps run under
    # inference_mode, so the KV cache and the CUDA-graph input buffers must be ones too,
    # or each decoder-layer graph compiles twice (once mid-run).
    from mmengine.cuda_graphs import CudaGraphRunner

    graphs = CudaGraphRunner(
        lambda ids, pos: ids, max_num_seqs=4, max_blocks_per_seq=4, max_model_len=64,
        mrope=False, device=torch.device("cpu"),
    )  # fmt: skip
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens"):
        assert getattr(graphs, name).is_inference(), name
    assert graphs.block_tables.is_inference()


def test_graph_sizes_add_decode_wave_edges_up_to_the_batch_limit() -> None:
    # 193-198 sequences (2 KV heads, 132 SMs) fill one wave unsplit: a 198 graph keeps them
    # off the 208 graph, whose 208 sequences split KV.
    from mmengine.cuda_graphs import CudaGraphRunner, graph_batch_sizes

    sizes = graph_batch_sizes(256, (198, 396))
    assert sizes[:4] == [1, 2, 4, 8] and 198 in sizes and 396 not in sizes
    assert sizes == sorted(set(sizes)) and sizes[-1] == 256
    graphs = CudaGraphRunner(
        lambda ids, pos: ids, max_num_seqs=256, max_blocks_per_seq=4, max_model_len=64,
        mrope=False, device=torch.device("cpu"), extra_sizes=(198,),
    )  # fmt: skip
    assert graphs.bucket(193) == 198 and graphs.bucket(199) == 208 and graphs.bucket(192) == 192


def test_runner_kv_cache_is_inference_tensors(qwen2_ckpt) -> None:  # noqa: ANN001
    from mmengine.config import EngineConfig
    from mmengine.model_loader import load_model_spec
    from mmengine.model_runner import ModelRunner

    spec = load_model_spec(qwen2_ckpt)
    runner = ModelRunner(
        EngineConfig(model=str(qwen2_ckpt)), spec, qwen2_ckpt, torch.device("cpu"),
        torch.float32, 64,
    )  # fmt: skip
    runner.allocate_kv_cache(4)
    assert all(k.is_inference() and v.is_inference() for k, v in runner.kv_caches)
