"""`llmtrace record [options] -- python your_script.py ARGS`: run any program with tracing on
in all its Python processes, then write trace.json, report.json, report.md like `run`.

The program records from interpreter start without importing llmtrace: its environment
puts llmtrace's bootstrap sitecustomize first on PYTHONPATH (`integrations.child_env`).
Its own spans (`llmtrace.span`, `@llmtrace.trace`) are classified into stages by name, and
unless --no-auto every process is instrumented at the boundaries every serving stack has
(`llmtrace.instrument()`: sockets, pipes, logging, sleep, serialization, torch's forward
and host copies, tokenizers, HTTP handlers), so an unannotated program gets its stages.
Deeper attribution: the in-process stack sampler (`--sample-hz`), py-spy from outside
(`--py-spy`, falling back to the sampler where ptrace is not permitted) and viztracer
inside chosen stages for a bounded number of steps (`--viztracer`).

`record` exits with the program's exit code (128 + N when signal N killed it) and writes
the trace whatever way the program ended. SIGINT and SIGTERM sent to `record` go on to
the program; a Ctrl-C from the terminal reaches the program directly (same process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from llmtrace.errors import UserError

_FORWARDED = {signal.SIGINT, signal.SIGTERM}
_SI_KERNEL = 0x80  # si_code of a signal the terminal sent (to the whole foreground group)


def main(args) -> int:
    from llmtrace import device_activity
    from llmtrace.integrations import child_env
    from llmtrace.integrations.pyspy import recorder_for
    from llmtrace.integrations.viztracer import WindowSpec
    from llmtrace.outputs import default_out_dir

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("give the program to record after `--`: llmtrace record -- python your_script.py ARGS")
    if args.py_spy_rate < 1 or args.sample_hz < 0 or args.device_activity < 0:
        raise UserError("--py-spy-rate must be >= 1, --sample-hz and --device-activity >= 0")
    window = WindowSpec.parse(args.viztracer_stages, args.viztracer_steps) if args.viztracer else None
    out = os.path.abspath(args.out or default_out_dir())
    if os.path.isdir(os.path.join(out, "spool")) and os.listdir(os.path.join(out, "spool")):
        raise UserError(f"{out} already holds a recording (spool/); choose another --out")
    os.makedirs(out, exist_ok=True)

    pyspy = recorder_for(out, args.py_spy_rate, "record") if args.py_spy else None
    if args.py_spy:  # in-process sampling only where py-spy is missing
        sample_hz = 0.0 if pyspy is not None else float(args.py_spy_rate)
    else:
        sample_hz = args.sample_hz
    env = child_env(
        os.environ,
        out,
        sample_hz=sample_hz,
        gc=args.gc or not args.no_auto,
        auto=not args.no_auto,
        viztracer=window.to_env() if window else None,
        pyspy=pyspy,
    )
    if args.device_activity:
        env[device_activity.ENV] = str(args.device_activity)
    return _finish(out, command, _run(command, env, pyspy, float(args.py_spy_rate)))


def _run(command: list[str], env: dict, pyspy, fallback_hz: float) -> int:
    """Start the program (and py-spy on it); wait for it, forwarding signals; its return code."""
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as e:
        raise UserError(f"cannot start {command[0]!r}: {e.strerror}") from None
    if pyspy is not None:
        pyspy.start(proc.pid)  # before the mask below, which children would inherit
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)  # held from here, forwarded by the wait
    try:
        if pyspy is not None:
            pyspy.open_gate_when_sampling(lambda: proc.poll() is None, fallback_hz, "record")
        rc = wait_forwarding_signals(proc)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if pyspy is not None:
        pyspy.finish()
    return rc


def wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for `proc` with SIGINT/SIGTERM blocked: those sent to this process go on to it.
    A terminal's Ctrl-C already reached it (si_code SI_KERNEL), so that one is not sent twice."""
    while proc.poll() is None:
        info = signal.sigtimedwait(_FORWARDED, 0.05)
        if info is not None and info.si_code != _SI_KERNEL and proc.poll() is None:
            proc.send_signal(info.si_signo)
    return proc.returncode


def exit_status(rc: int) -> tuple[int, str | None]:
    """(exit code `record` returns, failure text or None) for the program's return code."""
    if rc < 0:
        return 128 - rc, f"the program was killed by {signal.Signals(-rc).name}"
    if rc:
        return rc, f"the program exited with code {rc}"
    return 0, None


def _finish(out: str, command: list[str], rc: int) -> int:
    from llmtrace.load import load_trace
    from llmtrace.outputs import write_outputs

    code, failure = exit_status(rc)
    try:
        trace = load_trace(out)  # spools, plus what viztracer and py-spy left in `out`
    except UserError as e:
        print(
            f"llmtrace record: nothing recorded ({e}); the program needs to be Python with llmtrace "
            f"importable by its interpreter",
            file=sys.stderr,
        )
        return code or 1
    trace.meta["record"] = {"command": command, "exit_code": rc}
    write_outputs(out, trace, failure, command="record")
    return code
