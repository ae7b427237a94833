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
    out = _run(
        "import llmtrace, llmtrace.timeline, llmtrace.load, llmtrace.analyze.report; print(llmtrace.trace.__module__)"
    )
    assert out == "llmtrace.decorator"


def test_public_names():
    import llmtrace

    for name in ("span", "trace", "counter", "instant", "configure", "enabled", "flush", "shutdown"):
        assert callable(getattr(llmtrace, name)), name
    assert callable(llmtrace.context.current)


def test_naming_a_process_that_records_from_the_environment_keeps_its_records(tmp_path):
    code = (
        "import llmtrace\n"
        "with llmtrace.span('before.rename'): pass\n"
        "llmtrace.flush()\n"
        "llmtrace.configure(process_name='agent-7')\n"
        "with llmtrace.span('after.rename'): pass\n"
    )
    env = {**__import__("os").environ, "LLMTRACE_OUT": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    from llmtrace.timeline import load_spool_dir

    trace = load_spool_dir(str(tmp_path))
    assert [p.name for p in trace.processes.values()] == ["agent-7"]
    assert {"before.rename", "after.rename"} <= {s.name for s in trace.spans}
