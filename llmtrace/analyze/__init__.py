"""Trace analysis: serving metrics, the per-step/per-token overhead breakdown, the
suggestion rules, and the report built from them."""

from .report import build_report, render_markdown, render_text

__all__ = ["build_report", "render_text", "render_markdown"]
