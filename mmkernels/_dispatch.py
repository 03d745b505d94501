"""Chooses, per call, between a Triton kernel and its plain-torch reference.

Triton runs on CUDA tensors. On CPU tensors it runs only under Triton's interpreter, which
is how the tests check the kernels without a GPU: `TRITON_INTERPRET=1` must be set before
the first `import triton` of the process, because `@triton.jit` decides at decoration time
whether a function is compiled or interpreted (and so do Triton's own `tl.*` helpers).
"""

import functools
import os

import torch
from triton.runtime.jit import JITFunction

# Set to "1" to run the Triton kernels on CPU tensors too (needs TRITON_INTERPRET=1).
FORCE_TRITON_ENV = "MMENGINE_FORCE_TRITON"
# Set to "1" to launch every kernel plainly, without programmatic dependent launch.
DISABLE_PDL_ENV = "MMENGINE_DISABLE_PDL"


def use_triton(tensor: torch.Tensor, force: bool | None = None) -> bool:
    """Whether a kernel call on `tensor` should take the Triton path.

    Args:
        tensor: the call's main input; its device decides when nothing forces a choice.
        force: True or False to override; None to decide from the device and the
            `MMENGINE_FORCE_TRITON` environment variable.

    Returns:
        True for Triton, False for the torch reference.
    """
    if force is not None:
        return force
    if tensor.is_cuda:
        return True
    return os.environ.get(FORCE_TRITON_ENV, "0") == "1"


def check_launchable(kernel: object, tensor: torch.Tensor) -> None:
    """Raises a clear error instead of a driver error when Triton cannot run here.

    Args:
        kernel: a `@triton.jit` function of this package.
        tensor: the call's main input.
    """
    if tensor.is_cuda:
        return
    if isinstance(kernel, JITFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
            "before the first `import triton` of the process, or use the torch path."
        )


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# Launches over more tokens than this stay plain. In the decode graphs of the Qwen2.5-3B
# config PDL on the rotary and attention kernels cost 1.4% at 64 tokens (3.518 vs 3.469
# ms, medians of 7 alternating rounds, H200, session 10, benchmarks/ab_decode_graphs.py),
# was even at 16 and saved 5.4% at 1 (with the GEMV path).
PDL_MAX_TOKENS = 16


def pdl_supported(tensor: torch.Tensor, num_tokens: int | None = None) -> bool:
    """Whether a kernel on `tensor` may launch as a programmatic dependent (PDL) of the
    kernel before it: CUDA tensors on sm_90+ (never in the interpreter), for launches over
    at most `PDL_MAX_TOKENS` tokens when `num_tokens` is given.

    A PDL kernel may start while its predecessor finishes; it must call
    `tl.extra.cuda.gdc_wait()` before touching anything a kernel before it wrote, and calls
    `gdc_launch_dependents()` to let its own successor start early the same way.
    `MMENGINE_DISABLE_PDL=1` turns it off (A/B timing, or a driver that mishandles it).
    """
    if not tensor.is_cuda or os.environ.get(DISABLE_PDL_ENV, "0") == "1":
        return False
    if num_tokens is not None and num_tokens > PDL_MAX_TOKENS:
        return False
    return _capability_major(tensor.device.index or 0) >= 9


@functools.cache
def _capability_major(device_index: int) -> int:  # asked once per launch: cache it
    return torch.cuda.get_device_capability(device_index)[0]
