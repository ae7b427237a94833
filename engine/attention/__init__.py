"""Attention backends: `store_kv` + `attention` over a paged KV cache (see metadata.py)."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from .metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "get_backend"]

log = logging.getLogger(__name__)


def get_backend(device) -> ModuleType:
    """The attention backend module for `device`: Triton on CUDA when triton is installed, else torch_ref."""
    from . import torch_ref

    if str(device).startswith("cuda"):
        try:
            backend = importlib.import_module(f"{__name__}.triton")
        except ImportError as e:
            log.warning("triton attention unavailable (%s); using the torch reference backend", e)
        else:
            if backend.AVAILABLE:
                return backend
            log.warning("triton is not installed; using the torch reference attention backend")
    return torch_ref
