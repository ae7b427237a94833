"""Bad files given to `llmtrace analyze | export | tui | merge`: a clear error naming the
file and the byte offset, exit code 2, no traceback; a spool file that is whole up to some
batch (cut short by a crash, or a checksum mismatch in the middle) is read up to there,
with a warning that says which batch and where."""

from __future__ import annotations

import os
import random
import struct
import subprocess

import orjson
import pytest

import llmtrace
from llmtrace import context, sink
from llmtrace.cli import main as cli_main
from llmtrace.load import load_trace
from llmtrace.spool_format import encode_batch, read_spool

pytestmark = pytest.mark.timeout(60)

BATCHES, STEPS_PER_BATCH = 5, 4


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run directory whose one spool file holds BATCHES batches of STEPS_PER_BATCH steps."""
    out = tmp_path_factory.mktemp("good")
    was = llmtrace.recorder.is_enabled()
    # A finished process's pid: `llmtrace tui` opens a run whose writer is alive as a live run.
    gone = subprocess.Popen(["true"])
    gone.wait()
    sink.start(str(out), "master", context.trace_id, extra_header={"pid": gone.pid})
    llmtrace.recorder.set_enabled(True)
    try:
        for b in range(BATCHES):
            for i in range(STEPS_PER_BATCH):
                with llmtrace.span("master.step", step=b * STEPS_PER_BATCH + i, batch=2, tokens=2):
                    with llmtrace.span("schedule"):
                        pass
                    with llmtrace.span("forward"):
                        pass
            if b < BATCHES - 1:
                sink.flush()  # the last batch is the one stop() writes, with the spool's closing mark
    finally:
        sink.stop()
        llmtrace.recorder.set_enabled(was)
    (path,) = (out / "spool").iterdir()
    assert len(read_spool(str(path)).batches) == BATCHES
    return path.read_bytes()


def _run_dir(tmp_path, data: bytes) -> tuple[str, str]:
    spool = tmp_path / "run" / "spool"
    spool.mkdir(parents=True)
    (spool / "1.lts").write_bytes(data)
    return str(tmp_path / "run"), str(spool / "1.lts")


def _batch_offsets(data: bytes) -> list[int]:
    """Where each batch starts (the header's end first)."""
    pos = 16 + struct.unpack_from("<I", data, 12)[0]
    offsets = []
    while pos < len(data):
        offsets.append(pos)
        pos += 12 + struct.unpack_from("<I", data, pos + 4)[0]
    return offsets


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return rc, got.out, got.err


def _steps(run_dir: str) -> int:
    return sum(s.name == "master.step" for s in load_trace(run_dir).spans)


# ---- spool files whole up to some batch: read up to there, with a warning ---------------------------


def test_truncated_spool_is_read_up_to_its_last_whole_batch(tmp_path, capsys, good_run):
    last = _batch_offsets(good_run)[-1]
    run, path = _run_dir(tmp_path, good_run[: len(good_run) - 100])
    rc, out, err = _cli(capsys, "analyze", run)
    assert rc == 0 and f"warning: {path}: at byte {last}: batch {BATCHES}: batch of" in err
    assert _steps(run) == (BATCHES - 1) * STEPS_PER_BATCH
    rc, out, _ = _cli(capsys, "export", run, "-o", str(tmp_path / "t.json"))
    assert rc == 0 and f"ends early at byte {last}" in out


def test_bit_flip_mid_file_keeps_the_batches_before_it_and_names_the_batch(tmp_path, capsys, good_run):
    offsets = _batch_offsets(good_run)
    data = bytearray(good_run)
    data[offsets[2] + 40] ^= 0x10  # inside the third batch's payload
    run, path = _run_dir(tmp_path, bytes(data))
    rc, _, err = _cli(capsys, "analyze", run, "--json")
    assert rc == 0 and f"warning: {path}: at byte {offsets[2]}: batch 3: batch checksum mismatch" in err
    assert _steps(run) == 2 * STEPS_PER_BATCH


# ---- files that cannot be read: exit 2 naming the file and the offset ---------------------------------


def _bad_meta_batch(good: bytes) -> bytes:
    head = good[: _batch_offsets(good)[0]]
    return head + encode_batch([], {"threads": ["not", "a", "map"]}, b"", 0)


SPOOL_CASES = {
    "empty": (lambda good: b"", 0, "file is 0 bytes, too short for a spool header"),
    "random bytes": (lambda good: random.Random(1).randbytes(4000), 0, "not an llmtrace spool file"),
    "header cut": (lambda good: good[:30], 0, "too short for a spool header"),
    "header a JSON list": (
        lambda good: struct.pack("<8sHHI", b"LLMTRACE", 1, 0, 9) + b"[1, 2, 3]",
        16,
        "the header is not an object",
    ),
    "header not JSON": (
        lambda good: struct.pack("<8sHHI", b"LLMTRACE", 1, 0, 5) + b"{pid:",
        16,
        "malformed header JSON",
    ),
    "other version": (lambda good: good[:8] + struct.pack("<H", 7) + good[10:], 8, "spool version 7"),
    "batch meta a list": (_bad_meta_batch, None, "batch meta is not an object"),
}


@pytest.mark.parametrize("case", list(SPOOL_CASES))
def test_unreadable_spool_file_is_exit_2_naming_file_and_offset(tmp_path, capsys, good_run, case):
    make, offset, what = SPOOL_CASES[case]
    run, path = _run_dir(tmp_path, make(good_run))
    where = f"{path}: at byte {offset}: " if offset is not None else f"{path}: at byte "
    for argv in (["analyze", run], ["export", run, "-o", str(tmp_path / "t.json")], ["tui", run], ["analyze", path]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and f"llmtrace {argv[0]}: error: " in err and where in err and what in err, (argv, err)
    assert not (tmp_path / "t.json").exists()


def _export(tmp_path, good_run) -> bytes:
    run, _ = _run_dir(tmp_path / "src", good_run)
    assert cli_main(["export", run, "-o", str(tmp_path / "good.json")]) == 0
    return (tmp_path / "good.json").read_bytes()


JSON_CASES = {
    "empty": (b"", "at byte 0: malformed JSON"),
    "random bytes": (random.Random(2).randbytes(3000), "at byte 0: malformed JSON"),
    "a list of numbers": (b"[1, 2]", "not a"),
    "traceEvents not a list": (b'{"traceEvents": 5}', "not a"),
}


@pytest.mark.parametrize("case", [*JSON_CASES, "cut export"])
def test_unreadable_trace_json_is_exit_2_naming_the_file(tmp_path, capsys, good_run, case):
    if case == "cut export":
        data = _export(tmp_path, good_run)
        capsys.readouterr()
        data, what = data[: len(data) // 2], f"at byte {len(data) // 2}: malformed JSON"
    else:
        data, what = JSON_CASES[case]
    path = tmp_path / "trace.json"
    path.write_bytes(data)
    for argv in (
        ["analyze", str(path)],
        ["export", str(path), "-o", str(tmp_path / "t.json")],
        ["tui", str(path)],
        ["merge", str(path), "-o", str(tmp_path / "m.json")],
    ):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and f"{path.name}: " in err and what in err, (argv, err)


def test_merge_of_a_spool_file_or_wrong_shaped_events_is_exit_2(tmp_path, capsys, good_run):
    _, lts = _run_dir(tmp_path, good_run)
    rc, _, err = _cli(capsys, "merge", lts, "-o", str(tmp_path / "m.json"))
    assert rc == 2 and f"{lts}: at byte 0: malformed JSON" in err
    bad = tmp_path / "events.json"
    bad.write_bytes(orjson.dumps({"traceEvents": [1, "x", None]}))
    rc, _, err = _cli(capsys, "merge", str(bad), "-o", str(tmp_path / "m.json"))
    assert rc == 2 and "its 3 events are not objects" in err
    assert not os.path.exists(tmp_path / "m.json")
