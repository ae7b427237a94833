"""Processes as the program runs them: a multiprocessing child records under its
`Process.name` ("model-worker-1") instead of "python-<pid>-child", from the first line of
its target on (its spool file is renamed, losing nothing), and closes its spool when the
target returns (a forked child ends with os._exit(), which skips atexit); and a parent that reaps a
child (multiprocessing or subprocess) records a `process.exit` instant with the child's
pid and exit code, so a worker that died is reported with how (a negative code is the
signal: -9 for SIGKILL), even when it could write nothing itself."""

from __future__ import annotations

from .. import names, recorder, sink
from .patching import on_import, replace


def _named(orig):
    def _bootstrap(self, *args, **kwargs):
        running = sink.current()
        if running is not None:
            running.rename(self.name)
        try:
            return orig(self, *args, **kwargs)
        finally:
            if running is not None and sink.current() is running:
                sink.stop()

    return _bootstrap


def _exited(pid: int, code) -> None:
    if recorder.is_enabled() and isinstance(code, int):
        recorder.instant(names.I_PROCESS_EXIT, **{names.A_CHILD_PID: pid, names.A_EXIT_CODE: code})


def _mp_poll(orig):
    """multiprocessing's Popen.poll sets returncode once, when it reaps the child."""

    def poll(self, *args, **kwargs):
        was = self.returncode
        code = orig(self, *args, **kwargs)
        if was is None and code is not None:
            _exited(self.pid, code)
        return code

    return poll


def _subprocess_status(orig):
    """subprocess.Popen._handle_exitstatus: every wait()/poll() that reaps the child ends here."""

    def _handle_exitstatus(self, *args, **kwargs):
        was = self.returncode
        try:
            return orig(self, *args, **kwargs)
        finally:
            if was is None and self.returncode is not None:
                _exited(self.pid, self.returncode)

    return _handle_exitstatus


def install() -> None:
    on_import("multiprocessing.process", lambda mod: replace(mod.BaseProcess, "_bootstrap", _named))
    on_import("multiprocessing.popen_fork", lambda mod: replace(mod.Popen, "poll", _mp_poll))
    on_import("multiprocessing.popen_forkserver", lambda mod: replace(mod.Popen, "poll", _mp_poll))
    on_import("subprocess", lambda mod: replace(mod.Popen, "_handle_exitstatus", _subprocess_status))
