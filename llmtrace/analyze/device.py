"""What the GPU's own records say of the model spans that have them (device_activity.py):
how much of their CUDA-event interval the device was busy, with how many kernels and
launches. The breakdown splits each such span's device time into model and `device.idle`;
this summary is the report's "device" line and the launch-bound finding's evidence."""

from __future__ import annotations

from dataclasses import dataclass

from .. import names
from ..timeline import Span
from .index import TraceIndex
from .report_schema import DeviceSummary
from .stats import median


@dataclass(frozen=True)
class DeviceActivity:
    spans: int  # model spans with busy time recorded
    timed_spans: int  # model spans with device time (the share covered: spans / timed_spans)
    device_ns: int  # their CUDA-event intervals, summed
    busy_ns: int  # kernels and copies running (per span, the union of its records)
    kernels_per_span: float  # medians
    launches_per_span: float
    idle_ns_per_kernel: float  # (device - busy) / kernels, over all covered spans
    kernels: int

    @property
    def idle_ns(self) -> int:
        return self.device_ns - self.busy_ns

    @property
    def idle_share(self) -> float:
        return self.idle_ns / self.device_ns if self.device_ns else 0.0

    def to_dict(self) -> DeviceSummary:
        return {
            "spans": self.spans,
            "timed_spans": self.timed_spans,
            "device_ms": round(self.device_ns / 1e6, 3),
            "busy_ms": round(self.busy_ns / 1e6, 3),
            "idle_share": round(self.idle_share, 4),
            "kernels_per_span": self.kernels_per_span,
            "launches_per_span": self.launches_per_span,
            "idle_us_per_kernel": round(self.idle_ns_per_kernel / 1e3, 3),
        }


def has_busy(s: Span) -> bool:
    return s.device_dur_ns is not None and isinstance(s.attrs.get(names.A_BUSY_NS), int)


def device_activity(index: TraceIndex, model_stages: tuple[str, ...]) -> DeviceActivity | None:
    timed = [s for st in model_stages for s in index.by_stage.get(st, ()) if s.device_dur_ns is not None]
    spans = [s for s in timed if has_busy(s)]
    if not spans:
        return None
    device = sum(s.device_dur_ns or 0 for s in spans)
    busy = sum(min(s.attrs[names.A_BUSY_NS], s.device_dur_ns or 0) for s in spans)
    kernels = [int(s.attrs.get(names.A_KERNELS, 0)) for s in spans]
    return DeviceActivity(
        len(spans),
        len(timed),
        device,
        busy,
        median(kernels),
        median([int(s.attrs.get(names.A_LAUNCHES, 0)) for s in spans]),
        (device - busy) / sum(kernels) if sum(kernels) else 0.0,
        sum(kernels),
    )
