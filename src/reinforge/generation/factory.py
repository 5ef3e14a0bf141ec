"""Choose the generation backend from the config, and load a user's `rollout_func`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from reinforge.config.schema import ReinforgeConfig
from reinforge.generation.inprocess import InProcessGenerator


def build_generator(cfg: ReinforgeConfig, policy, tokenizer):
    """The in-process backend (default). Raises ValueError for `trl.use_vllm` until that backend exists."""
    if cfg.trl.use_vllm:
        raise ValueError("trl.use_vllm: the vLLM server backend is not available yet; remove use_vllm to generate in-process")
    eos = [tokenizer.eos_token_id]
    extra = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    for e in extra if isinstance(extra, list) else [extra]:
        if e is not None and e not in eos:
            eos.append(e)
    return InProcessGenerator(policy, tokenizer.pad_token_id, eos)


def import_object(spec: str) -> Callable:
    """`module.fn` → the object, importing from the working directory first. Raises ImportError naming `spec`."""
    module_name, _, attr = spec.rpartition(".")
    if not module_name:
        raise ImportError(f"{spec!r} is not of the form module.fn")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    if not hasattr(module, attr):
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
    return getattr(module, attr)


def load_rollout_func(spec: str | None) -> Callable | None:
    """The user's rollout function, or None. It is called as
    `fn(prompts=, prompt_ids=, generator=, tokenizer=, params=)` and returns a `reinforge.generation.Rollout`."""
    return import_object(spec) if spec else None
