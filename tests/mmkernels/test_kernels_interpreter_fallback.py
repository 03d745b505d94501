"""Runs this folder's CPU kernel tests in a fresh process when this one cannot interpret.

See conftest.py: once triton has been imported without TRITON_INTERPRET=1 (by another test
module of the same run, or because CUDA is present), kernels cannot be interpreted in this
process, so the CPU tests are skipped here and this test runs them in a child process that
sets the variable before anything imports triton.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD_ENV = "MMENGINE_KERNEL_TESTS_CHILD"


def test_cpu_kernel_tests_pass_in_a_fresh_interpreter_process(interpreter_active: bool) -> None:
    if interpreter_active:
        pytest.skip("this process interprets Triton: the CPU kernel tests ran directly")
    # A child that cannot interpret either must fail, not start another child.
    assert os.environ.get(_CHILD_ENV) != "1", "TRITON_INTERPRET=1 did not take effect"
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{_CHILD_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    proc = subprocess.run(
        [*cmd, str(here)],
        cwd=here.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
