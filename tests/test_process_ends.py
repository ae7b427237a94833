"""A process that dies is reported: `llmtrace record` of a program whose multiprocessing
worker is SIGKILLed and whose subprocess exits with code 3 warns about both (the parent
saw them reaped), says nothing of the workers that ended cleanly, and keeps the trace."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import multiprocessing as mp, os, signal, subprocess, sys, time

    def work():
        while True:
            time.sleep(0.01)

    if __name__ == "__main__":
        doomed = mp.Process(target=work, name="doomed-worker")
        doomed.start()
        time.sleep(0.5)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join()
        subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"])
        fine = mp.Process(target=time.sleep, args=(0.1,), name="fine-worker")
        fine.start()
        fine.join()
""")


def test_dead_children_are_reported_with_how_they_died(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "llmtrace.cli", "record", "--sample-hz", "0", "--out", str(out), "--",
                        sys.executable, str(prog)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        ends = json.load(f)["process_ends"]
    by_how = {e["how"]: e for e in ends}
    assert set(by_how) == {"killed by SIGKILL", "exited with code 3"}, ends
    assert by_how["killed by SIGKILL"]["name"] == "doomed-worker" and by_how["killed by SIGKILL"]["exit_code"] == -9
    assert "warning: process doomed-worker" in r.stdout and "killed by SIGKILL" in r.stdout
    assert not any(e["name"] == "fine-worker" for e in ends)
