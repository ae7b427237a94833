"""The run configuration of `llmtrace run --config FILE` and `llmtrace serve`.

Frozen dataclasses with defaults, one per YAML section. `load_config` checks a YAML file or a
dict (plus `--set a.b=value` overrides) against them: every bad key or value is a
`ConfigError` naming the key path, the bad value and what is allowed.

Field metadata drives the checks: `choices` (allowed values), `ge`/`gt`/`le` (bounds). A
section may add cross-field rules in `_check(path)`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmtrace.errors import UserError

MODEL_PRESETS = ("tiny", "llama2-7b", "llama3-8b")


class ConfigError(UserError):
    """A config key or value that is not allowed; `key` is its dotted path when known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _opt(default, *, choices=None, ge=None, gt=None, le=None):
    meta = {k: v for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return field(default=default, metadata=meta)


def _section(cls):
    return field(default_factory=cls)


@dataclass(frozen=True)
class ModelConfig:
    preset: str | None = _opt(None, choices=MODEL_PRESETS)  # "tiny" when no path is given
    path: str | None = None  # Hugging Face checkpoint directory, instead of a preset
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    seed: int = 0

    def __post_init__(self):
        if self.preset is None and self.path is None:
            object.__setattr__(self, "preset", "tiny")

    def _check(self, path: str) -> None:
        if self.preset is not None and self.path is not None:
            raise ConfigError(
                f"{path}.path: give either preset or path, not both (preset is {self.preset!r})", f"{path}.path"
            )
        if self.path is not None and not Path(self.path).is_dir():
            raise ConfigError(
                f"{path}.path: {self.path!r} is not a directory; give a Hugging Face checkpoint directory",
                f"{path}.path",
            )

    def resolve_device(self) -> str:
        """`auto` means CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolve_dtype(self, device: str) -> str:
        """`auto` means float32 on the CPU (no fast bf16 matmuls there), bfloat16 on CUDA."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device == "cuda" else "float32"


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = _opt(16, choices=(8, 16, 32))
    num_blocks: int | None = _opt(None, ge=1)  # None: the model runner sizes the KV cache
    max_num_seqs: int = _opt(32, ge=1)
    max_batched_tokens: int = _opt(2048, ge=1)
    prefill_batch_size: int = _opt(8, ge=1)
    max_model_len: int = _opt(2048, ge=1)
    agents: int = _opt(1, ge=1)  # replicas: every agent runs the whole model (a test of the protocol)
    tensor_parallel: int = _opt(1, ge=1)  # agents sharing one model (heads and MLP columns), one process group
    host: str = "127.0.0.1"
    port: int = _opt(8000, ge=0, le=65535)  # vLLM's default; 0: any free port
    max_waiting: int = _opt(1024, ge=1)
    cuda_graphs: bool = True
    async_scheduling: bool = True  # plan and send step n+1 while the agents run step n
    metrics_prefix: str = "vllm:"  # GET /metrics series names: vLLM's, for its dashboards and scrapers

    @property
    def num_agents(self) -> int:
        return self.tensor_parallel if self.tensor_parallel > 1 else self.agents

    def _check(self, path: str) -> None:
        if self.tensor_parallel > 1 and self.agents > 1:
            raise ConfigError(
                f"{path}.agents: {self.agents} replicas and tensor_parallel {self.tensor_parallel} "
                f"cannot be combined; use one of them",
                f"{path}.agents",
            )
        # A preempted sequence is recomputed in one prefill step, so the longest sequence
        # must fit the step's token budget, or it could never be scheduled again.
        if self.max_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"{path}.max_batched_tokens: {self.max_batched_tokens} is smaller than "
                f"{path}.max_model_len ({self.max_model_len}); a prefill (or the recompute of a "
                f"preempted sequence) runs in one step, so use at least {self.max_model_len}",
                f"{path}.max_batched_tokens",
            )
        if self.max_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"{path}.max_batched_tokens: {self.max_batched_tokens} is smaller than "
                f"{path}.max_num_seqs ({self.max_num_seqs}); a decode step of max_num_seqs "
                f"sequences would not fit, so use at least {self.max_num_seqs}",
                f"{path}.max_batched_tokens",
            )
        if self.num_blocks is not None and self.num_blocks * self.block_size < self.max_model_len:
            need = -(-self.max_model_len // self.block_size)
            raise ConfigError(
                f"{path}.num_blocks: {self.num_blocks} blocks of {self.block_size} tokens cannot hold one "
                f"sequence of {path}.max_model_len ({self.max_model_len}) tokens; use at least {need}",
                f"{path}.num_blocks",
            )


_DIST_KEYS = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std")}


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: {dist: fixed, value} | {dist: uniform, min, max} |
    {dist: normal, mean, std}. A bare integer N means {dist: fixed, value: N}."""

    dist: str = _opt("fixed", choices=tuple(_DIST_KEYS))
    value: int | None = _opt(None, ge=1)
    min: int | None = _opt(None, ge=1)
    max: int | None = _opt(None, ge=1)
    mean: float | None = _opt(None, gt=0)
    std: float | None = _opt(None, ge=0)

    @classmethod
    def _from_scalar(cls, value):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return {"dist": "fixed", "value": value} if is_int else value

    def _check(self, path: str) -> None:
        needed = _DIST_KEYS[self.dist]
        for key in ("value", "min", "max", "mean", "std"):
            given = getattr(self, key) is not None
            if key in needed and not given:
                raise ConfigError(
                    f"{path}.{key}: missing; dist {self.dist} needs {' and '.join(needed)}", f"{path}.{key}"
                )
            if key not in needed and given:
                raise ConfigError(
                    f"{path}.{key}: not used by dist {self.dist}; it takes {' and '.join(needed)}", f"{path}.{key}"
                )
        if self.dist == "uniform" and self.min > self.max:
            raise ConfigError(f"{path}.max: {self.max} is smaller than min ({self.min})", f"{path}.max")

    @property
    def upper_bound(self) -> int | None:
        """The largest length it can produce (None for the unbounded normal)."""
        return {"fixed": self.value, "uniform": self.max}.get(self.dist)


DEFAULT_NUM_REQUESTS = 100


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int | None = _opt(None, ge=1)  # DEFAULT_NUM_REQUESTS unless duration_s
    duration_s: float | None = _opt(None, gt=0)
    arrival: str = _opt("closed", choices=("poisson", "closed"))
    rate: float | None = _opt(None, gt=0)  # requests/s, for poisson arrivals
    concurrency: int = _opt(8, ge=1)  # requests in flight, for closed-loop arrivals
    input_len: LengthDist = field(default_factory=lambda: LengthDist(value=128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist(value=128))
    seed: int = 0
    ignore_eos: bool = True  # random weights emit EOS at random; benchmarks want fixed lengths
    stream: bool = True
    prompt: str = "random"  # "random": text from the tokenizer corpus; else this fixed string

    def __post_init__(self):
        if self.num_requests is None and self.duration_s is None:
            object.__setattr__(self, "num_requests", DEFAULT_NUM_REQUESTS)

    def _check(self, path: str) -> None:
        if self.num_requests is not None and self.duration_s is not None:
            raise ConfigError(
                f"{path}.duration_s: give either num_requests or duration_s, not both "
                f"(num_requests is {self.num_requests})",
                f"{path}.duration_s",
            )
        if self.arrival == "poisson" and self.rate is None:
            raise ConfigError(f"{path}.rate: missing; arrival poisson needs rate (requests/s)", f"{path}.rate")


@dataclass(frozen=True)
class VizTracerConfig:
    stages: tuple[str, ...] = ("preprocess", "sampling", "postprocess")
    steps: int = _opt(20, ge=1)


@dataclass(frozen=True)
class PySpyConfig:
    rate: int = _opt(200, ge=1, le=10000)


@dataclass(frozen=True)
class TraceConfig:
    out: str | None = None
    detail: str = _opt("basic", choices=("basic", "full"))
    capture_text: bool = False
    viztracer: VizTracerConfig | None = None
    py_spy: PySpyConfig | None = None
    device_activity: int = _opt(0, ge=0)  # on a GPU: model spans whose kernel records give busy vs idle
    live: bool = False


@dataclass(frozen=True)
class AntipatternsConfig:
    """Deliberate mistakes the engine can switch on, so the analyzer has something to find."""

    log_arrays: bool = False
    concat_padding: bool = False
    host_sampling: bool = False
    no_tcp_nodelay: bool = False
    prefill_batch_1: bool = False
    host_timed_forward: bool = False
    gc_churn: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = _section(ModelConfig)
    engine: EngineConfig = _section(EngineConfig)
    workload: WorkloadConfig = _section(WorkloadConfig)
    trace: TraceConfig = _section(TraceConfig)
    antipatterns: AntipatternsConfig = _section(AntipatternsConfig)

    def _check(self, path: str) -> None:
        limit = self.engine.max_model_len
        longest = self.workload.input_len.upper_bound
        if longest is not None and longest > limit:
            raise ConfigError(
                f"workload.input_len: prompts up to {longest} tokens do not fit engine.max_model_len ({limit})",
                "workload.input_len",
            )

    def to_dict(self) -> dict:
        """Plain dicts/lists, for writing into the run's output; `load_config` reads it back."""
        return _plain(dataclasses.asdict(self))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_config(source: str | Path | Mapping | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Read and check a run config from a YAML file path or a dict, then apply
    `a.b=value` overrides (values parsed as YAML)."""
    if source is None or isinstance(source, Mapping):
        data, where = copy.deepcopy(dict(source or {})), None
    else:
        data, where = _read_yaml(Path(source)), str(source)
    for item in overrides:
        _apply_override(data, item)
    try:
        return _build(RunConfig, data, "")
    except ConfigError as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}", e.key) from None


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with the sections {_names(RunConfig)}, got {_show(data)}")
    return data


def _apply_override(data: dict, item: str) -> None:
    import yaml

    key, eq, text = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. engine.block_size=32")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {item!r}: {where} is {_show(child)}, not a mapping", where)
        node = child
    node[parts[-1]] = value


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping) and hasattr(cls, "_from_scalar"):
        data = cls._from_scalar(data)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path or 'config'}: {_show(data)} is not allowed; expected a mapping with keys {_names(cls)}",
            path or None,
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key_path}: unknown key{hint}; allowed keys: {_names(cls)}", key_path)
        value = _convert(value, hints[key], key_path)
        _check_bounds(value, fields[key].metadata, key_path)
        kwargs[key] = value
    obj = cls(**kwargs)
    if hasattr(obj, "_check"):
        obj._check(path)
    return obj


def _convert(value, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: {_show(value)} is not allowed; expected a list", path)
        elem = typing.get_args(tp)[0]
        return tuple(_convert(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[tp]
        raise ConfigError(f"{path}: {_show(value)} is not allowed; expected {expected}", path)
    return value


def _check_bounds(value, meta: Mapping, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{path}: {_show(value)} is not allowed; use one of {', '.join(str(c) for c in choices)}", path
        )
    for key, ok, words in (
        ("ge", lambda b: value >= b, "at least"),
        ("gt", lambda b: value > b, "greater than"),
        ("le", lambda b: value <= b, "at most"),
    ):
        if key in meta and not ok(meta[key]):
            raise ConfigError(f"{path}: {_show(value)} is not allowed; use a value {words} {meta[key]}", path)


def _names(cls) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)
