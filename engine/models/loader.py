"""Build Llama models: random weights from a preset, or an HF checkpoint directory.

No hub access: a checkpoint is a local directory with config.json and *.safetensors
(single file or sharded with model.safetensors.index.json).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..attention import get_backend
from ..tokenizer import Tokenizer, tokenizer_path
from .llama import LlamaConfig, LlamaForCausalLM
from .presets import PRESETS

INIT_STD = 0.02
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_config(preset_or_hf_config: str | dict | LlamaConfig) -> LlamaConfig:
    if isinstance(preset_or_hf_config, LlamaConfig):
        return preset_or_hf_config
    if isinstance(preset_or_hf_config, str):
        if preset_or_hf_config not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_hf_config!r}; choose from {sorted(PRESETS)}")
        preset_or_hf_config = PRESETS[preset_or_hf_config]
    return LlamaConfig.from_hf(preset_or_hf_config)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _instantiate(cfg: LlamaConfig, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    # Parameters are created directly in the target dtype and device (no float32 copy on the host).
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg, get_backend(device))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def build_random_model(
    preset_or_hf_config: str | dict | LlamaConfig,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> LlamaForCausalLM:
    """A model with N(0, 0.02) weights and unit norms; same seed and device -> same weights."""
    model = _instantiate(resolve_config(preset_or_hf_config), resolve_dtype(dtype), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=gen)
    return model


def _safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return sorted({ckpt / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint directory {ckpt}")
    return files


def load_checkpoint(
    ckpt_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> LlamaForCausalLM:
    """An HF Llama checkpoint directory (config.json + safetensors) loaded shard by shard."""
    from safetensors import safe_open

    ckpt = Path(ckpt_dir)
    config_path = ckpt / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not an HF checkpoint directory")
    hf = json.loads(config_path.read_text())
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{config_path}: model_type {hf['model_type']!r} is not supported (llama only)")
    model = _instantiate(LlamaConfig.from_hf(hf), resolve_dtype(dtype), device)

    def weights():
        for path in _safetensors_files(ckpt):
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    model.load_weights(weights())
    return model


def save_checkpoint(model: LlamaForCausalLM, ckpt_dir: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write an HF-compatible directory: config.json, model.safetensors, optionally tokenizer.model."""
    import shutil

    from safetensors.torch import save_file

    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    cfg = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.hf_weights()}
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, ckpt / "tokenizer.model")
    return ckpt


def load_model(model_cfg) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model and tokenizer of an `engine.config.ModelConfig`.

    A checkpoint directory when model_cfg.path is set, else random weights for
    model_cfg.preset (seeded by model_cfg.seed); "auto" device/dtype resolved by the config.
    """
    device = model_cfg.resolve_device()
    dtype = model_cfg.resolve_dtype(device)
    if model_cfg.path:
        model = load_checkpoint(model_cfg.path, dtype, device)
    else:
        model = build_random_model(model_cfg.preset, dtype, device, model_cfg.seed)
    tokenizer = Tokenizer(tokenizer_path(model_cfg))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer
