"""Lines that exist only to feed a log call (llmtrace/analyze/log_only.py): their samples are
the log finding's time, not the step's unexplained host work."""

from __future__ import annotations

import textwrap

from llmtrace.analyze.functions import line_callee
from llmtrace.analyze.log_only import log_only_lines

SERVER = textwrap.dedent("""\
    import logging
    import numpy as np
    log = logging.getLogger(__name__)

    def sample(probs, verbose):
        token = int(np.argmax(probs))
        top = np.argsort(probs)[-5:][::-1]
        shown = top.tolist()
        if verbose:
            log.info("top %s of %s",
                     shown, probs[top].round(4))
        best = np.argsort(probs)[-2:]
        log.debug("best %s", best)
        return token, best

    def step(self, batch):
        padded = np.stack(batch)
        self.logger.debug(f"batch {padded}")
        kept = padded.sum()
        def later():
            return kept
        log.warning("kept %s", kept)
        return padded, later
    """)


def _lines(tmp_path) -> tuple[str, dict[int, str]]:
    path = tmp_path / "server.py"
    path.write_text(SERVER)
    return str(path), log_only_lines(str(path))


def test_the_values_a_log_call_alone_reads_are_log_only_to_a_fixed_point(tmp_path):
    _, lines = _lines(tmp_path)
    # top (read by shown and the call) and shown (read by the call only); both lines of the call
    assert {7: "info", 8: "info", 10: "info", 11: "info"}.items() <= lines.items()
    assert 6 not in lines  # the token is returned
    assert 12 not in lines and lines[13] == "debug"  # best is returned too: only the call itself


def test_a_value_used_anywhere_else_keeps_its_assignment(tmp_path):
    _, lines = _lines(tmp_path)
    assert lines[18] == "debug" and lines[22] == "warning"  # self.logger.debug, log.warning
    assert 17 not in lines  # padded is returned
    assert 19 not in lines  # kept is read by a nested function as well


def test_a_sample_on_a_log_only_line_is_the_log_calls(tmp_path):
    path, _ = _lines(tmp_path)
    assert line_callee("__main__:sample:7", path) == "logging.Logger.info"
    assert line_callee("__main__:sample:11", path) == "logging.Logger.info"  # a continuation line
    assert line_callee("__main__:sample:12", path) == "numpy.argsort"


def test_a_file_that_does_not_parse_gives_no_lines(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n    log.debug('x')\n")
    assert log_only_lines(str(path)) == {} and log_only_lines(str(tmp_path / "missing.py")) == {}
