"""The public surface: cheap to import, and names that stay what they are."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_pulls_in_no_heavy_modules():
    out = _run("import sys, llmtrace; print(sorted(m for m in ('torch', 'numpy', 'textual') if m in sys.modules))")
    assert out == "[]"


def test_trace_stays_the_decorator_after_submodules_load():
    out = _run("import llmtrace, llmtrace.timeline, llmtrace.load, llmtrace.analyze.report; "
               "print(llmtrace.trace.__module__)")
    assert out == "llmtrace.decorator"


def test_public_names():
    import llmtrace

    for name in ("span", "trace", "counter", "instant", "configure", "enabled", "flush", "shutdown"):
        assert callable(getattr(llmtrace, name)), name
    assert callable(llmtrace.context.current)
