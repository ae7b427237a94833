"""`concat-padding`: building padded batch arrays with repeated concatenation.

Fingerprints, on the steps' critical path: nested spans or functions named
`np.concatenate` / `numpy.concatenate` (also `np.pad`, `np.append`, `np.vstack`,
`np.hstack`, `torch.cat`, `Tensor.cat`), a `preprocess.pad` span, or any host function
whose name says it concatenates (a stack sampler names a C call by its Python caller,
e.g. `pad_by_concatenate`). Each call allocates and copies the whole array; growing a
batch row by row is quadratic.
Saving: their union time per token. Writing rows into a buffer preallocated once at the
padded shape copies each element once, which is a small fraction of that (not subtracted:
the estimate is the upper end).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..functions import main_stage

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "concat-padding"
AFTER = ("log-in-hot-path",)  # a torch.cat inside the tensor printer a log call runs is the log's
PATTERN = re.compile(
    r"(^|\.)(np|numpy)\.(concatenate|pad|append|vstack|hstack|stack)$"
    r"|^(torch\.cat|Tensor\.cat|torch\.stack)$|^preprocess\.pad$|concatenat"
)


def check(ctx: Analysis) -> list[Suggestion]:
    found = ctx.removable(PATTERN)
    if found is None:
        return []
    calls, saving, ev, ns_per_step = found
    stage = main_stage(calls)
    per_step = ev["functions"][0]["count"] / max(1, ev["steps_affected"])
    return [
        ctx.suggestion(
            ID,
            f"Padding by concatenation costs {saving:.2f} ms/token in {stage} "
            f"({per_step:.0f} call{'s' if round(per_step) != 1 else ''}/step)",
            stage,
            {**ev, "ms_per_token": round(saving, 4)},
            saving,
            "Preallocate the padded arrays once (np.full((max_batch, max_len), pad_id)) and write each "
            "sequence's row in place, or keep persistent per-slot buffers updated by the step's diff; "
            "never grow arrays with np.concatenate/np.pad inside the step loop.",
            per_step=ns_per_step,
        )
    ]
