"""The model boundary of a torch program: the outermost `nn.Module.__call__` of a thread
is a `forward` span (device-timed with CUDA events on a GPU, as the engine's is: no
added sync), and the points where the host waits for (or copies from) the device are
`sync.wait` spans with the bytes moved: `Tensor.item/.tolist/.cpu/.numpy`,
`torch.cuda.synchronize`, event and stream synchronize. On a CPU `tolist`/`numpy` of a
whole logits tensor is host work of the same kind (a vocab-sized copy per token); smaller
CPU conversions (a tensor printer's, a few ids) are not recorded.
Nothing is recorded while torch.compile traces."""

from __future__ import annotations

import threading

from .. import gpu, names, recorder
from .caller import name_if_slow
from .patching import on_import, replace, traced

_local = threading.local()
_device_timing: bool | None = None  # decided at the first forward on a CUDA tensor


def _first_tensor(torch, args, kwargs):
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _forward_attrs(torch, args, kwargs) -> dict:
    t = _first_tensor(torch, args, kwargs)
    if t is None or t.dim() == 0:
        return {}
    attrs = {names.A_BATCH: int(t.shape[0])}
    if t.dim() == 2 and not t.is_floating_point():  # token ids [batch, tokens]
        attrs[names.A_TOKENS] = int(t.numel())
    return attrs


def _on_device(torch, args, kwargs) -> bool:
    global _device_timing
    if _device_timing is None:
        t = _first_tensor(torch, args, kwargs)
        if t is None or not t.is_cuda:
            return False
        _device_timing = gpu.install()
    return _device_timing


def _module_call(torch, compiling):
    def wrap(orig):
        def __call__(self, *args, **kwargs):
            if getattr(_local, "inside", False) or not recorder.is_enabled() or compiling():
                return orig(self, *args, **kwargs)
            _local.inside = True
            try:
                with recorder.span(
                    names.FORWARD,
                    device=_on_device(torch, args, kwargs),
                    fn=type(self).__name__,
                    **_forward_attrs(torch, args, kwargs),
                ):
                    return orig(self, *args, **kwargs)
            finally:
                _local.inside = False

        return __call__

    return wrap


MIN_HOST_ELEMENTS = 1024  # on a CPU only conversions of a vocab row or more are worth a span


def _host_copy(compiling, fn: str, only_cuda: bool):
    def wrap(orig):
        def copy(t, *args, **kwargs):
            if (
                not recorder.is_enabled()
                or compiling()
                or (not t.is_cuda and (only_cuda or t.numel() < MIN_HOST_ELEMENTS))
            ):
                return orig(t, *args, **kwargs)
            with recorder.span(names.SYNC_WAIT, fn=fn, **{names.A_BYTES: t.numel() * t.element_size()}) as sp:
                try:
                    return orig(t, *args, **kwargs)
                finally:
                    name_if_slow(sp)

        return copy

    return wrap


def _patch(torch) -> None:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
    replace(torch.nn.Module, "__call__", _module_call(torch, compiling))
    for fn, only_cuda in (("tolist", False), ("numpy", False), ("cpu", True), ("item", True)):
        replace(torch.Tensor, fn, _host_copy(compiling, fn, only_cuda))
    for owner in (torch.cuda, torch.cuda.Event, torch.cuda.Stream):
        replace(owner, "synchronize", traced(names.SYNC_WAIT, names.SYNC))


def install() -> None:
    on_import("torch", _patch)
