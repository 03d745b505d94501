"""Runs the Triton kernels on CPU tensors through Triton's interpreter.

`@triton.jit` decides when a function is decorated, not when it is launched, whether it is
compiled or interpreted, and Triton's own `tl.*` helpers are decorated when triton is first
imported. So TRITON_INTERPRET=1 must be in the environment before the first `import triton`
of the process. This conftest sets it as early as pytest lets this folder run code; if
another test module of the same run imported triton before that, this process cannot
interpret, and the CPU kernel tests are skipped here and run instead in a fresh process by
`test_kernels_interpreter_fallback.py`.

On a machine with CUDA the variable is left alone, since the GPU tests must compile; the
CPU kernel tests then run in the fresh process too, with CUDA hidden.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_HERE = Path(__file__).parent
FALLBACK_TEST = "test_kernels_interpreter_fallback.py"


def triton_interpreter_active() -> bool:
    """Whether kernels launched by this process run in Triton's interpreter."""
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from mmkernels.rms_norm import _rms_norm_kernel

    helpers = [
        v for v in vars(tl_standard).values() if isinstance(v, JITFunction | InterpretedFunction)
    ]
    return isinstance(_rms_norm_kernel, InterpretedFunction) and all(
        isinstance(v, InterpretedFunction) for v in helpers
    )


@pytest.fixture(scope="session")
def interpreter_active() -> bool:
    return triton_interpreter_active()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if triton_interpreter_active():
        return
    skip = pytest.mark.skip(
        reason=f"triton was imported before TRITON_INTERPRET=1; run by {FALLBACK_TEST}"
    )
    for item in items:
        path = Path(str(item.fspath))
        if path.parent != _HERE or path.name == FALLBACK_TEST:
            continue
        if item.get_closest_marker("gpu") is None:
            item.add_marker(skip)
