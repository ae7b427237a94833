"""The engine as a child process: `llmtrace serve` (server + master, which spawns the
agents) started, watched until it prints its address, and stopped; its exit is kept.
Used by `llmtrace run` and the benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

from llmtrace.cli import ENV_COMMAND

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
URL_RE = re.compile(r"(http://[\w.\-\[\]:]+)")


class EngineProcess:
    """The `llmtrace serve` child: started, watched, stopped; its exit status is kept."""

    def __init__(self, config_path: str, log_dir: str, out: str | None = None, env: dict | None = None):
        """out: record the engine's trace there (else it runs untraced); env: the child's
        environment (default: this process's)."""
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", **{ENV_COMMAND: "run"})
        cmd = [sys.executable, "-m", "llmtrace.cli", "serve", "--config", config_path, "--port", "0", "--no-report"]
        if out is not None:
            cmd += ["--out", out]
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, "engine.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, start_new_session=True
        )
        self.url: str | None = None

    def wait_ready(self) -> str:
        """Read the child's stdout until it prints its address (or dies)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self._log.write(line)
            m = URL_RE.search(line)
            if m:
                self.url = m.group(1).rstrip("/")
                threading.Thread(target=self._pump, daemon=True).start()
                return self.url
        self.stop()
        raise EngineCrashed(self.describe_exit("the engine did not start"), self.log_tail())

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_exit(self, what: str) -> str:
        rc = self.proc.poll()
        if rc is None:
            return f"{what} (still running)"
        if rc < 0:
            return f"{what}: killed by signal {signal.Signals(-rc).name}"
        return f"{what}: exit code {rc}"

    def log_tail(self, n: int = 20) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.flush()
        return self.proc.returncode


class EngineCrashed(Exception):
    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail
