"""Build the C recorder for every CPython on this machine and run its lifetime stress test
(scripts/recorder_stress.py) where memory errors show: PYTHONMALLOC=malloc with
MALLOC_PERTURB_ (fresh and freed memory filled with a garbage byte), and AddressSanitizer.

A reference-count or lifetime error in _fastspan.c rarely crashes the interpreter it was
written on: CPython 3.12 made Py_SET_REFCNT skip counts that look immortal, so a bug can
depend on the interpreter's version and on what the allocator hands back. Hence every
version found (python3.10 ... python3.14 on PATH or under pyenv), not just this one.

    python scripts/check_recorder_memory.py [--seconds S] [--no-asan]   # prints a table; exit 1 on a failure
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "llmtrace", "_fastspan.c")
STRESS = os.path.join(ROOT, "scripts", "recorder_stress.py")
# glibc fills fresh blocks with 0xFE (~1) and freed ones with 0x01: a fresh object's
# uninitialised reference count then reads as negative, i.e. immortal, on 3.12+.
PERTURB = {"PYTHONMALLOC": "malloc", "MALLOC_PERTURB_": "1"}


def interpreters() -> list[str]:
    """One executable per CPython minor version found, this one first."""
    found = {sys.version_info[:2]: sys.executable}
    candidates = [shutil.which(f"python3.{m}") for m in range(10, 15)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-4]*/bin/python3")))
    for exe in filter(None, candidates):
        v = _version(exe)
        if v is not None and v not in found:
            found[v] = exe
    return list(found.values())


def _version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[0]), int(out[1])


def asan_runtime() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    lib = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return lib if os.path.isabs(lib) and os.path.exists(lib) else None


def build(exe: str, dest: str, asan: bool) -> str:
    """A copy of the llmtrace package under dest with _fastspan built for exe; returns dest."""
    shutil.copytree(
        os.path.join(ROOT, "llmtrace"),
        os.path.join(dest, "llmtrace"),
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    include, suffix = subprocess.run(
        [exe, "-c", "import sysconfig as s; print(s.get_paths()['include']); print(s.get_config_var('EXT_SUFFIX'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    flags = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address"] if asan else ["-O2"]
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            *flags,
            f"-I{include}",
            SOURCE,
            "-o",
            os.path.join(dest, "llmtrace", f"_fastspan{suffix}"),
        ],
        check=True,
        capture_output=True,
    )
    return dest


def stress(exe: str, pkg: str, seconds: float, asan_lib: str | None) -> tuple[bool, str]:
    env = {**os.environ, **PERTURB, "PYTHONPATH": pkg, "PYTHONFAULTHANDLER": "1"}
    env.pop("LLMTRACE_PURE_PYTHON", None)
    if asan_lib:
        # Python's own allocations are not instrumented: only leaks would be noise.
        env.update(LD_PRELOAD=asan_lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")
    p = subprocess.run([exe, STRESS, str(seconds)], capture_output=True, text=True, env=env, timeout=seconds + 120)
    ok = p.returncode == 0 and p.stdout.startswith("ok") and " c" in p.stdout
    return ok, (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else f"rc {p.returncode}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="stress time per run (default 3)")
    ap.add_argument("--no-asan", action="store_true", help="only the MALLOC_PERTURB_ runs")
    args = ap.parse_args(argv)
    asan_lib = None if args.no_asan else asan_runtime()
    rows, failed = [], False
    for exe in interpreters():
        v = "%d.%d" % _version(exe)
        for mode, lib in [("malloc-perturb", None)] + ([("asan", asan_lib)] if asan_lib else []):
            with tempfile.TemporaryDirectory() as tmp:
                ok, last = stress(exe, build(exe, tmp, lib is not None), args.seconds, lib)
            failed |= not ok
            rows.append((v, mode, "ok" if ok else "FAIL", last[:90]))
    print(f"{'python':<7} {'mode':<15} {'result':<6} last line")
    for r in rows:
        print(f"{r[0]:<7} {r[1]:<15} {r[2]:<6} {r[3]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
