"""Other tools in an llmtrace recording: how a recorded program's processes start
(`child_env`), what the tools leave in the run directory (`attach_run_data`), and how
their function names become the analyzer's ("logging.Logger.debug", whatever tool saw
the frame).

Run directory, besides spool/:
    viztracer/<pid>.json   viztracer's events inside the chosen stages (viztracer.py)
    pyspy/pyspy.json       py-spy's chrometrace of the whole run, pyspy/clock.json its alignment
"""

from __future__ import annotations

import os
import sys

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bootstrap")
# Where `import llmtrace` comes from: a recorded program may run another interpreter.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_HOME = "LLMTRACE_HOME"


def child_env(
    base: dict,
    out: str,
    *,
    sample_hz: float = 0.0,
    gc: bool = False,
    auto: bool = False,
    viztracer: str | None = None,
    pyspy=None,
) -> dict:
    """The environment that makes every Python process of a program record into `out`
    from interpreter start: the bootstrap directory first on PYTHONPATH (its
    sitecustomize configures llmtrace from these variables), plus the settings."""
    from .. import ENV_AUTO, ENV_ENABLED, ENV_GC, ENV_OUT, ENV_PROCESS_NAME, ENV_SAMPLE_HZ, ENV_TRACE_ID, context
    from . import pyspy as pyspy_mod
    from . import viztracer as viztracer_mod

    env = dict(base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = BOOTSTRAP_DIR + (os.pathsep + path if path else "")
    env[ENV_HOME] = PACKAGE_PARENT
    env[ENV_OUT] = os.path.abspath(out)
    env[ENV_ENABLED] = "1"
    env[ENV_TRACE_ID] = f"{context.trace_id:x}"
    env[ENV_SAMPLE_HZ] = str(sample_hz)
    env[ENV_GC] = "1" if gc else "0"
    env[ENV_AUTO] = "1" if auto else "0"
    for stale in (ENV_PROCESS_NAME, viztracer_mod.ENV, pyspy_mod.ENV_GATE, pyspy_mod.ENV_ACTIVE):
        env.pop(stale, None)  # each process names itself; tools only where asked
    if viztracer:
        env[viztracer_mod.ENV] = viztracer
    if pyspy is not None:  # a PySpyRecorder
        env.update(pyspy.gate_env())
    return env


def attach_run_data(run_dir: str, trace) -> None:
    """Add what viztracer and py-spy left in `run_dir` to `trace` (on its clock)."""
    from ..export.foreign_events import EMBEDDED, file_digest
    from . import pyspy, viztracer

    events, windows = viztracer.load_run(run_dir)
    trace.foreign_events.extend(events)
    if windows:
        trace.meta["viztracer"] = windows
    trace.samples.extend(pyspy.load_run_samples(run_dir))
    files = viztracer.run_files(run_dir) + pyspy.run_files(run_dir)
    if files:  # `merge` of the export with one of these files must not add its events twice
        trace.meta[EMBEDDED] = sorted(file_digest(p) for p in files)
    trace.sort()


def module_of(filename: str) -> str:
    """'/usr/lib/python3.11/logging/__init__.py' -> 'logging': the dotted path below the
    longest sys.path entry holding the file; else the file's stem."""
    if filename.startswith("<frozen "):
        return filename[len("<frozen ") :].rstrip(">")
    path = os.path.abspath(filename)
    best = ""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".")
        if path.startswith(entry + os.sep) and len(entry) > len(best):
            best = entry
    rel = os.path.relpath(path, best) if best else os.path.basename(path)
    rel = rel[:-3] if rel.endswith(".py") else rel
    parts = [p for p in rel.split(os.sep) if p]
    if parts and parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def function_name(qualname: str, filename: str) -> str:
    """The analyzer's name for a Python function: 'logging.Logger.debug'."""
    return f"{module_of(filename)}.{qualname}" if filename else qualname
