"""Recording from interpreter start for `llmtrace record`: this directory is put first on
the recorded program's PYTHONPATH, so every Python process of it (children included)
runs this before its own code, whether or not it imports llmtrace. Then the
sitecustomize this one shadows, if any, runs as it would have."""

import os
import sys


def _start() -> None:
    """`import llmtrace` records from the environment (spool, sampler, viztracer window,
    py-spy gate: llmtrace/__init__.py)."""
    if not os.environ.get("LLMTRACE_OUT"):
        return
    try:
        import llmtrace  # noqa: F401

        return
    except ImportError:
        pass
    # another interpreter than the one llmtrace is installed in: find the package last on
    # the path, so it shadows nothing of the program's
    home = os.environ.get("LLMTRACE_HOME")
    if home:
        sys.path.append(home)
    try:
        import llmtrace  # noqa: F401,F811
    except ImportError as e:
        print(f"llmtrace: not recording this process ({sys.executable}): {e}", file=sys.stderr)


def _chain() -> None:
    """Run the next sitecustomize on sys.path (the one this file hides)."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    spec.loader.exec_module(module)


_start()
_chain()
