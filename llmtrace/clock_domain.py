"""Which monotonic clock a process's timestamps are on, for aligning hosts (clock_align.py).

Processes of one host share CLOCK_MONOTONIC; another host's is unrelated. The spool header
names the clock's domain (the host's boot id: a reboot restarts the clock, a container
shares its host's) and the Unix time of the clock's zero (`epoch_offset_ns`, good to the
hosts' NTP sync, milliseconds): the merge aligns other domains from it first, then from the
round trips of the messages the processes exchanged.

Tests make a process look like another host with LLMTRACE_TEST_CLOCK=NAME=MONO[,WALL]:
the process named NAME at its spool's start writes every timestamp MONO ns later and a
Unix clock WALL ns off (an imperfect NTP sync), in a domain of its own. Nothing else reads
it: it only moves a test process's records, never a real one's.
"""

from __future__ import annotations

import os
import struct

from .spool_format import RECORD

ENV_TEST_CLOCK = "LLMTRACE_TEST_CLOCK"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_TIMES = struct.Struct("<qq")  # a record's start and end: its first 16 bytes (spool_format.RECORD)


def domain() -> str:
    """This host's clock domain: hostname and boot id (the hostname alone where there is none)."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    host = os.uname().nodename  # the hostname, without importing socket at `import llmtrace`
    return f"{host}/{boot}" if boot else host


def injected_skew(process_name: str) -> tuple[int, int]:
    """(monotonic offset, Unix skew) ns that LLMTRACE_TEST_CLOCK gives this process; (0, 0) if none."""
    spec = os.environ.get(ENV_TEST_CLOCK, "")
    name, _, values = spec.partition("=")
    if not spec or name != process_name:
        return 0, 0
    parts = [int(v) for v in values.split(",")]
    return parts[0], parts[1] if len(parts) > 1 else 0


def shift_records(records: bytes, n: int, delta_ns: int) -> bytes:
    """The records with start and end moved by delta_ns (the test clock's offset)."""
    out = bytearray(records)
    for i in range(n):
        pos = i * RECORD.size
        start, end = _TIMES.unpack_from(out, pos)
        _TIMES.pack_into(out, pos, start + delta_ns, end + delta_ns)
    return bytes(out)
