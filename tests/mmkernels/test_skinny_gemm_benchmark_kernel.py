"""The Triton GEMM of benchmarks/bench_skinny_gemm.py against torch, in the interpreter.

The benchmark only reports a config's time after checking its result on the GPU; this
checks the kernel's tiling, masking and split-K sums on small shapes on CPU."""

import pytest
import torch

from benchmarks.bench_skinny_gemm import SHAPES, configs, skinny_mm

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "cfg",
    [(16, 32, 64, 2, 4, 1), (32, 64, 64, 3, 4, 2), (16, 32, 128, 2, 4, 4), (64, 32, 64, 2, 4, 3)],
)
def test_skinny_gemm_matches_matmul_with_and_without_k_splits(cfg: tuple) -> None:
    torch.manual_seed(0)
    m, n, k = 20, 128, 512  # 20 rows: the last row tile is partly masked
    x, w = torch.randn(m, k), torch.randn(n, k)
    out = torch.empty(m, n)
    part = torch.empty(cfg[5], m, n)
    got = skinny_mm(x, w, out, part, cfg)
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-4, atol=1e-3)


def test_skinny_gemm_sweep_tiles_divide_every_projection() -> None:
    for rows in (16, 64, 192, 256):
        for n, k in SHAPES.values():
            cfgs = configs(rows, n, k, sms=132)
            assert cfgs, (rows, n, k)
            for bm, bn, bk, stages, _warps, split in cfgs:
                assert n % bn == 0 and k % bk == 0 and k // bk >= 2 * split
                assert stages * (bm + bn) * bk * 2 <= 200 * 1024
