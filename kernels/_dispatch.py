"""Chooses, per call, between a Triton kernel and its plain-torch reference.

Triton runs on CUDA tensors. On CPU tensors it runs only under Triton's interpreter, which
is how the tests check the kernels without a GPU: `TRITON_INTERPRET=1` must be set before
the first `import triton` of the process, because `@triton.jit` decides at decoration time
whether a function is compiled or interpreted (and so do Triton's own `tl.*` helpers).
"""

import os

import torch
from triton.runtime.jit import JITFunction

# Set to "1" to run the Triton kernels on CPU tensors too (needs TRITON_INTERPRET=1).
FORCE_TRITON_ENV = "MMENGINE_FORCE_TRITON"


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
