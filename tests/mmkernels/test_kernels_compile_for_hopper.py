"""Compiles Triton kernels for an H100 (sm_90) on the CPU-only machine.

The interpreter runs a kernel's Python, not Triton's compiler, so code the compiler rejects
(a reassigned constexpr, a uint32 literal above 2**31) passes the CPU tests and fails only
on a GPU. Compiling needs no GPU: a child process (this one may interpret) lowers each
kernel through Triton's own passes and ptxas for sm_90, for each set of constexpr flags.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmkernels.sampling import _sample_kernel

    target = GPUTarget("cuda", 90, 32)
    # (logits dtype, top-k dtype, loop width, candidate sort width, top-k on): the engine's
    # three variants (no top-k; the 256 and 2048 sorts) and two other widths and dtypes.
    cases = [
        ("fp32", "i64", 4096, 1, False),
        ("fp32", "i64", 4096, 256, True),
        ("fp32", "i64", 4096, 2048, True),
        ("bf16", "i32", 2048, 256, True),
        ("fp32", "i64", 8192, 1, False),
    ]
    for dtype, k_type, block, cap, top_k in cases:
        sig = {
            "out_ptr": "*i64", "x_ptr": "*" + dtype, "stride_row": "i32",
            "temperature_ptr": "*fp32", "top_k_ptr": "*" + k_type, "top_p_ptr": "*fp32",
            "min_p_ptr": "*fp32", "seed_ptr": "*i64", "scratch_ptr": "*fp32", "vocab": "i32",
            "CAP": "constexpr", "BLOCK": "constexpr", "USE_TOP_K": "constexpr",
        }
        consts = {"CAP": cap, "BLOCK": block, "USE_TOP_K": top_k}
        compiled = triton.compile(
            ASTSource(_sample_kernel, sig, constexprs=consts), target=target,
            options={"num_warps": 16},
        )
        assert compiled.asm["ptx"], consts
    print("compiled")
    """
)


GEMV_CHILD = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmkernels.gemv import _gemv_kernel, launch_config

    target = GPUTarget("cuda", 90, 32)
    POINTERS = {
        "positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "cos_sin_ptr": "*fp32",
        "counter_ptr": "*i32",
    }
    flags = list(itertools.product([False, True], repeat=4))  # norm, bias, gated, residual
    cases = [(rows, *f, False) for rows, f in itertools.product([1, 2, 8], flags)]
    cases += [(rows, norm, True, False, False, True) for rows in (1, 2, 8) for norm in (0, 1)]
    # One row with K in one tile (x read once by the fused norm): qkv and gate_up.
    whole = {(1, 1, True, False, False, True), (1, 1, False, True, False, False)}
    cases += [c + (True,) for c in whole]
    cases = [c if len(c) == 7 else c + (False,) for c in cases]
    # o_proj (+ residual) writing the next RMSNorm of its rows (gemv_norm_out).
    cases = [c + (False,) for c in cases] + [(r, 0, False, False, True, False, False, True) for r in (1, 4)]
    for rows, norm, bias, gated, res, rope, one_tile, norm_out in cases:
        k = 11008 if res and not norm_out else 2048
        if rope:  # Qwen2.5-3B's QKV: 1280 rotation pairs
            cfg = launch_config(rows, 1280, 2048, rope=True)
        else:
            cfg = launch_config(rows, 2048, k, gated, norm=bool(norm))
        if one_tile:
            cfg = cfg._replace(block_k=2048)
        consts = {
            "HAS_NORM": bool(norm), "HAS_BIAS": bias, "GATED": gated, "HAS_RESIDUAL": res,
            "ROPE": rope, "PAIRED": gated or rope, "HALF": 64, "NUM_Q_HEADS": 16,
            "NUM_KV_HEADS": 2, "CACHE_BLOCK_SIZE": 16, "IS_MROPE": bool(rope and norm),
            "MROPE_END_T": 16, "MROPE_END_H": 40, "USE_PDL": True, "TRIGGER": 2 if rope else 0 if res else 1,
            "DOT": cfg.dot, "NUM_STAGES": cfg.num_stages if cfg.dot else None, "DOT_PRECISION": "tf32",
            "BLOCK_M": max(16, triton.next_power_of_2(rows)) if cfg.dot else triton.next_power_of_2(rows),
            "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "NORM_BLOCK_K": max(cfg.block_k, min(cfg.norm_block_k, 2048)) if cfg.dot else cfg.block_k,
            "ONE_TILE": not cfg.dot and k <= cfg.block_k,
            "NORM_OUT": norm_out, "NORM_OUT_N": 2048 if norm_out else 1,
        }
        sig = {}
        for name in _gemv_kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = POINTERS.get(name, "*bf16")
            else:
                sig[name] = "fp32" if name in ("eps", "eps_out") else "i32"
        compiled = triton.compile(
            ASTSource(_gemv_kernel, sig, constexprs=consts), target=target,
            options={"num_warps": cfg.num_warps},
        )
        ptx = compiled.asm["ptx"]
        # The trigger sits where TRIGGER says: before the wait (0), after it (1 and 2).
        trigger, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
        assert trigger >= 0 and wait >= 0, consts
        assert (trigger < wait) == (consts["TRIGGER"] == 0), consts
        # Pipelined tensor-core tiles must fit an sm_90 SM's shared memory (227 KiB).
        assert compiled.metadata.shared <= 232448, (consts, compiled.metadata.shared)
    print("compiled")
    """
)


def _compile_in_child(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


def test_sampling_kernel_compiles_for_sm90() -> None:
    _compile_in_child(CHILD)


def test_gemv_kernel_compiles_for_sm90() -> None:
    _compile_in_child(GEMV_CHILD)


MLP_FLOW_CHILD = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmkernels.mlp_flow import _mlp_flow_kernel

    target = GPUTarget("cuda", 90, 32)
    for ticket in (True, False):
        consts = {
            "O_BN": 2, "KIN_PAD": 2048, "H_PAD": 2048, "GU_BN": 2, "D_BN": 4, "CHUNK": 1024,
            "TICKET": ticket, "USE_PDL": True, "ASM": True,
        }
        sig = {}
        for name in _mlp_flow_kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name == "sync_ptr":
                sig[name] = "*i32"
            elif name == "part_ptr":
                sig[name] = "*fp32"
            elif name.endswith("_ptr"):
                sig[name] = "*bf16"
            else:
                sig[name] = "fp32" if name == "eps" else "i32"
        compiled = triton.compile(
            ASTSource(_mlp_flow_kernel, sig, constexprs=consts), target=target,
            options={"num_warps": 4},
        )
        ptx = compiled.asm["ptx"]
        # The spin waits poll with acquire loads; the PDL wait and trigger are in.
        assert "ld.global.acquire.gpu.b32" in ptx and "griddepcontrol.wait" in ptx, ticket
    print("compiled")
    """
)


def test_mlp_flow_kernel_compiles_for_sm90() -> None:
    _compile_in_child(MLP_FLOW_CHILD)
