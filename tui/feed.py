"""The live data source: tails every process's spool file of a run (OUT/spool/<pid>.lts).

Each file is read from the end of the last batch decoded; only complete, checksummed
batches are decoded (a batch the writer is still writing is read again at the next poll,
and so is a mapped spool file's zero-filled tail, which the writer fills in place), so a
poll costs what was appended since the previous one, never a re-read of the file.
"""

from __future__ import annotations

import glob
import os

from llmtrace.sink import SPOOL_SUFFIX
from llmtrace.spool_format import SpoolError, parse_header, scan_batches
from llmtrace.timeline import Process, RecordDecoder, Trace

# Recent spans per process that a late DEVICE record can still be joined to (a step or two).
KEEP_IDS = 1 << 14
HEADER_PROBE = 1 << 16  # bytes read to find a spool file's header


class SpoolTail:
    """One process's spool file, read incrementally."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0  # bytes of the file decoded so far (header and complete batches)
        self.problem = ""  # set when the file is corrupt: it is not read any further
        self.process: Process | None = None
        self._decoder: RecordDecoder | None = None
        self.batches = 0

    def read(self, out: Trace) -> int:
        """Decode the batches completed since the last call into `out`; returns how many."""
        if self.problem:
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        if not new:
            return 0
        try:
            return self._decode(memoryview(new), out)
        except SpoolError as e:
            self.problem = str(e)
            return 0

    def _decode(self, data: memoryview, out: Trace) -> int:
        pos = 0
        if self._decoder is None:
            head = parse_header(data, self.path)
            if head is None:
                return 0
            header, pos = head
            self.offset = pos
            pid = int(header.get("pid", 0))
            self.process = Process(pid, header.get("process_name", str(pid)), header, source=self.path)
            self._decoder = RecordDecoder(self.process, keep_ids=KEEP_IDS)
        scan = scan_batches(data, pos, self.path)
        for b in scan.batches:
            self._decoder.add(b, out)
        base = self.offset - pos  # the file offset of data[0]
        if scan.problem and not scan.incomplete:
            raise SpoolError(self.path, base + scan.end, scan.problem)
        self.offset = base + scan.end
        self.batches += len(scan.batches)
        return len(scan.batches)


class SpoolFeed:
    """Every spool file of a run directory (new ones are picked up as processes start)."""

    def __init__(self, run_dir: str):
        spool = os.path.join(run_dir, "spool")
        self.spool_dir = (
            spool if os.path.isdir(spool) or not glob.glob(os.path.join(run_dir, "*" + SPOOL_SUFFIX)) else run_dir
        )
        self.tails: dict[str, SpoolTail] = {}
        self.processes: dict[int, Process] = {}

    def _paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.spool_dir, "*" + SPOOL_SUFFIX)))

    def writer_pids(self) -> list[int]:
        """The pids that wrote the spool files (from their headers only)."""
        pids = []
        for path in self._paths():
            with open(path, "rb") as f:
                data = memoryview(f.read(HEADER_PROBE))
            try:
                head = parse_header(data, path)
            except SpoolError:
                continue
            if head is not None:
                pids.append(int(head[0].get("pid", 0)))
        return pids

    def poll(self) -> Trace:
        """The records appended since the last poll, as a Trace (its `processes` are all seen so far)."""
        for path in self._paths():
            if path not in self.tails:
                self.tails[path] = SpoolTail(path)
        out = Trace(processes=self.processes)
        for tail in self.tails.values():
            try:
                tail.read(out)
            except FileNotFoundError:
                continue
            if tail.process is not None:
                self.processes[tail.process.pid] = tail.process
        return out

    @property
    def problems(self) -> list[str]:
        return [t.problem for t in self.tails.values() if t.problem]
