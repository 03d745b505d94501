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


# Where a PDL kernel lets its successor launch (`gdc_launch_dependents()`): before its own
# `gdc_wait()` (its successor may launch while the kernel before this one still runs, so
# it fetches its weights earlier), right after it, or after its main loop. Each launching
# kind has a default; MMENGINE_PDL_TRIGGER ("kind=place,...", kinds below; read at launch)
# overrides them for A/B benchmarks. Measurements: docs/design-notes.md.
PDL_TRIGGER_ENV = "MMENGINE_PDL_TRIGGER"
TRIGGER_PLACES = ("early", "start", "late")  # the kernels' TRIGGER constexpr: 0, 1, 2
PDL_TRIGGER_DEFAULTS = {
    "rope": "late",  # the QKV + rotary GEMV (its successor is attention)
    "gated": "start",  # the gate_up GEMV
    "plain": "start",  # o_proj, down and any other GEMV
    "attn": "start",  # paged attention's split kernel
}


def pdl_trigger(kind: str) -> int:
    """The TRIGGER constexpr of a `kind` launch (a key of `PDL_TRIGGER_DEFAULTS`): 0 early
    (before its `gdc_wait`), 1 at its start (after the wait), 2 late (after its main loop).
    Safe anywhere: before its wait a kernel reads only what no kernel writes (weights)."""
    places = dict(PDL_TRIGGER_DEFAULTS)
    spec = os.environ.get(PDL_TRIGGER_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, place = item.partition("=")
        if name not in places or place not in TRIGGER_PLACES:
            raise ValueError(
                f"{PDL_TRIGGER_ENV}: expected KIND=PLACE items with KIND one of "
                f"{', '.join(places)} and PLACE one of {', '.join(TRIGGER_PLACES)}, got {item!r}"
            )
        places[name] = place
    return TRIGGER_PLACES.index(places[kind])
