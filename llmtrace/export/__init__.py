"""Trace exports: Chrome trace JSON for ui.perfetto.dev / chrome://tracing, and reading it back."""

from .chrome import ExportStats, write_chrome_trace
from .load_chrome import load_chrome_trace

__all__ = ["ExportStats", "write_chrome_trace", "load_chrome_trace"]
