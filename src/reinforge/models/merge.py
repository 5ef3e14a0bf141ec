"""`reinforge merge-lora`: fold a trained LoRA adapter into its base model and save a plain model.

Axolotl's `axolotl merge-lora config.yml --lora-model-dir=DIR` does the same and writes `output_dir/merged`.
The adapter is the one `reinforge train` saves in `output_dir` (or any directory holding
`adapter_config.json`, e.g. a checkpoint `output_dir/checkpoint-<step>`). The merge itself is peft's
`merge_and_unload` on the base model loaded as training loads it (float32), so W + (α/r)·B·A is computed
in float32; the result is then cast to the dtype it is saved in (see `merged_dtype`).

The merged directory holds safetensors weights, `config.json`, `generation_config.json` and the tokenizer
that training used (`load_tokenizer`: the config's `tokenizer_config`/`base_model` tokenizer with the
config's `chat_template`, and a pad token), so `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR).apply_chat_template(...)` render and answer as the trained adapter does.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from reinforge.config.schema import ReinforgeConfig

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MERGED_SUBDIR = "merged"


class ArtifactError(RuntimeError):
    """A trained model or adapter that is not where the command looks for it; the message says how to get it."""


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a peft adapter directory (it has `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def has_full_model(path: str | Path) -> bool:
    """Whether `path` holds a full model as `save_pretrained` writes it (config.json and safetensors weights)."""
    path = Path(path)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def check_adapter_dir(path: str | Path, config_path: str = "CONFIG") -> Path:
    """`path` as a Path when it is a peft adapter directory.

    Args:
        path: the directory to check (`--lora-model-dir`, or the config's `output_dir`).
        config_path: the config file, named in the hint of the error.
    Raises:
        ArtifactError: the directory does not exist, or it has no `adapter_config.json` (the message names the
            path, says what is there instead, and how to obtain an adapter).
    """
    path = Path(path)
    how = (f"train one with `reinforge train {config_path}` (with `adapter: lora` it saves the adapter in output_dir) "
           f"or pass --lora-model-dir DIR (a directory with {ADAPTER_CONFIG}, e.g. output_dir/checkpoint-<step>)")
    if not path.is_dir():
        raise ArtifactError(f"no LoRA adapter: {path} does not exist; {how}")
    if not is_adapter_dir(path):
        found = "a full model (trained without `adapter:`), which needs no merge" if has_full_model(path) \
            else f"no {ADAPTER_CONFIG}"
        raise ArtifactError(f"{path} is not a peft adapter directory: it holds {found}; {how}")
    return path


def _dtype_of(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return None


def merged_dtype(cfg: ReinforgeConfig) -> torch.dtype:
    """The dtype the merged model is saved in.

    `bf16: true` → bfloat16 and `fp16: true` → float16 (what the run was configured to compute in, and what
    Axolotl saves); otherwise (`bf16: false` or `auto`, which depended on the training machine) the dtype the
    base model is stored in (its config's `dtype`), float32 when it does not say. Overrides choose at merge
    time, e.g. `reinforge merge-lora CONFIG bf16=true`.
    """
    if cfg.bf16 is True:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    from transformers import AutoConfig

    from reinforge.models.loading import resolve_model_path

    base = AutoConfig.from_pretrained(resolve_model_path(cfg.base_model))
    return _dtype_of(getattr(base, "dtype", None)) or _dtype_of(getattr(base, "torch_dtype", None)) or torch.float32


def load_adapter_model(cfg: ReinforgeConfig, adapter_dir: str | Path):
    """The base model (loaded as training loads it, float32) with the adapter of `adapter_dir`, in eval mode.

    Args:
        cfg: the run's config (`base_model`).
        adapter_dir: a directory accepted by `check_adapter_dir`.
    Raises:
        ValueError: `adapter: qlora` without CUDA (as training); errors of peft for an adapter of another model.
    """
    from peft import PeftModel

    from reinforge.models.loading import load_causal_lm

    if cfg.adapter == "qlora" and not torch.cuda.is_available():
        raise ValueError("adapter: qlora needs a CUDA GPU (bitsandbytes 4-bit); use adapter: lora on this machine")
    base = load_causal_lm(cfg.base_model, cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def merge_lora(cfg: ReinforgeConfig, lora_model_dir: str | Path | None = None, config_path: str = "CONFIG",
               out_dir: str | Path | None = None) -> Path:
    """Merge the trained adapter into the base model and save it (weights, tokenizer, chat template).

    Args:
        cfg: the run's config; needs `adapter:` unless `lora_model_dir` is given.
        lora_model_dir: the adapter directory (default: the config's `output_dir`, where `reinforge train`
            saves it).
        config_path: the config file, named in hints.
        out_dir: where to save (default `output_dir/merged`). Written to `<out_dir>.tmp` and renamed into
            place, replacing an earlier merge.
    Returns:
        The directory of the merged model.
    Raises:
        ConfigError: the config has no `adapter:` and no `lora_model_dir` is given.
        ArtifactError: the adapter directory is missing or is not a peft adapter.
    """
    from reinforge.config import ConfigError
    from reinforge.models.loading import load_tokenizer

    if not cfg.adapter and lora_model_dir is None:
        raise ConfigError(f"{config_path}: merge-lora merges a LoRA adapter, but the config has no `adapter:` (it "
                          f"trains all weights; its output_dir {cfg.output_dir} already holds the full model); set "
                          f"`adapter: lora` or pass --lora-model-dir DIR")
    adapter_dir = check_adapter_dir(lora_model_dir if lora_model_dir is not None else cfg.output_dir, config_path)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / MERGED_SUBDIR
    dtype = merged_dtype(cfg)
    tokenizer = load_tokenizer(cfg)
    model = load_adapter_model(cfg, adapter_dir)
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turns the KV cache off; a saved model generates with it
    merged.to(dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("merged %s into %s (%s): %s", adapter_dir, cfg.base_model, dtype, out)
    return out
