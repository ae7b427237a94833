"""The program's function that called an instrumented library function, as a span attr
(`caller`): a C call that holds the GIL (Tensor.tolist, json.dumps) is never seen from
inside by the in-process sampler, so its span names who made it. One dict lookup per
call: labels are cached per code object."""
from __future__ import annotations

import sys

_labels: dict = {}


def caller(depth: int = 2) -> str:
    """'module.qualname' of the frame `depth` levels above this call."""
    frame = sys._getframe(depth)
    code = frame.f_code
    label = _labels.get(code)
    if label is None:
        label = _labels[code] = f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
    return label

