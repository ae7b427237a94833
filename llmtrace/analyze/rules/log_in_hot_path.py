"""`log-in-hot-path`: logging (and the formatting of its arguments) inside a step.

Fingerprints, on the steps' critical path:
- nested llmtrace spans named `logging.<level>` (e.g. `logging.debug` around a log call),
  or any span of stage `logging`;
- function-level events (viztracer, stack samples) such as `logging.Logger.debug`,
  `Logger._log`, `Handler.emit`, and array/tensor formatting: any frame of numpy's
  `arrayprint` (`array2string`, `_array_str_implementation`, `_formatArray`, ...) or of
  `torch._tensor_str`, which an f-string in a log call runs even when the level is off.
Saving: the union time of these calls per token (removing the call removes all of it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ... import names
from ..functions import main_stage

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "log-in-hot-path"
PATTERN = re.compile(
    r"^logging(\.|$)|(^|\.)Logger\.(debug|info|warning|error|exception|log|_log|handle)$"
    r"|(^|\.)Handler\.(emit|handle)$|(^|\.)(arrayprint|_tensor_str)\."
    r"|(^|\.)(_array_repr|_array_str|array2string|array_repr)$"
)


def check(ctx: Analysis) -> list[Suggestion]:
    found = ctx.removable(PATTERN, names.LOGGING)
    if found is None:
        return []
    calls, saving, ev, ns_per_step = found
    stages = sorted({c.stage for c in calls})
    return [
        ctx.suggestion(
            ID,
            f"Logging / array formatting in the hot path costs {saving:.2f} ms/token ({', '.join(stages)})",
            main_stage(calls),
            {**ev, "stages": stages, "ms_per_token": round(saving, 4)},
            saving,
            "Remove per-step log calls or guard them with `if logger.isEnabledFor(logging.DEBUG):`; "
            "never format arrays/tensors in a log message on the step path (pass lazy %-args, log shapes "
            "not contents, or log every N steps).",
            per_step=ns_per_step,
        )
    ]
