"""The C recorder's object lifetimes under every CPython on the machine, where memory
errors crash: PYTHONMALLOC=malloc with MALLOC_PERTURB_, and AddressSanitizer when gcc
ships it (scripts/check_recorder_memory.py; the stress program is scripts/recorder_stress.py).

This is the check that catches a span freed inside its own `with` on 3.12+ (the agent's
SIGSEGV on the GPU) without a GPU."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "check_recorder_memory", os.path.join(ROOT, "scripts", "check_recorder_memory.py")
)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the C recorder")
MODES = [("malloc-perturb", False), ("asan", True)]


@pytest.mark.parametrize("exe", check.interpreters(), ids=lambda e: "py%d.%d" % check._version(e))
@pytest.mark.parametrize("mode,asan", MODES, ids=[m for m, _ in MODES])
def test_stress_survives(exe, mode, asan, tmp_path):
    lib = check.asan_runtime() if asan else None
    if asan and lib is None:
        pytest.skip("gcc has no AddressSanitizer runtime")
    ok, last = check.stress(exe, check.build(exe, str(tmp_path), asan), 1.5, lib)
    assert ok, f"{mode} on {exe}: {last}"
