"""Moving the policy's current weights to a generation backend (`WeightSync`), without NCCL.

- `SharedWeights`: the in-process backend samples from the training module itself; nothing moves.
- `LoraFileSync`: the peft adapter is saved (safetensors) to `directory/reinforge-v{version}`, loaded by the
  vLLM server at run time under that name (`/v1/load_lora_adapter`), generation switches to it, and the previous
  version is unloaded and its directory removed. Prefix-cache entries are keyed by adapter, so old KV blocks
  are never reused for a new version; the cache is reset too when the server allows it. With a fixed `name`
  (NeMo Gym multi-turn: the agent's model proxy asks for one model name), every version is loaded under that
  name instead: the previous one is unloaded, the new one loaded from its own directory (a new path, so no KV
  block of an older version is reused). The caller drains generation first, so no request sees the gap. Adapters
  are never loaded in place (vLLM 0.32 would re-read them from disk whenever it schedules them).
- `FullWeightSync`: the whole state dict (a LoRA policy merged: W + ΔW, computed without touching the training
  module's weights) is written to `directory/v{version}.safetensors` and loaded by every vLLM worker through
  the worker extension `reinforge.serving.vllm_worker` (`/collective_rpc`), then the prefix cache is reset.

Both file paths must be visible to the server: same machine, or a shared filesystem. A sync runs on the main
thread (it reads the training module).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from reinforge.rollout.vllm import VLLMClient, VLLMError

log = logging.getLogger(__name__)

LOAD_WEIGHTS_METHOD = "reinforge_load_weights"  # defined by reinforge.serving.vllm_worker.ReinforgeWorkerExtension


class WeightSync(Protocol):
    """Makes a backend sample from `model`'s current weights, tagged `version` (optimiser steps taken)."""

    needed: bool

    def push(self, model: Any, version: int) -> None:
        ...


class SharedWeights:
    """In-process generation: the backend reads the training module's weights directly."""

    needed = False

    def push(self, model: Any, version: int) -> None:  # noqa: D401 - nothing to move
        return None


class LoraFileSync:
    """Adapter files → runtime LoRA loading on a vLLM server (see module docstring).

    Args: client: the server's VLLMClient; directory: where adapter versions are written (created); name: the
    served name every version is loaded under (None: `reinforge-v{version}`, a new name per version).
    Raises (push): VLLMError from the server (e.g. `name` is the served base model's name).
    """

    needed = True

    def __init__(self, client: VLLMClient, directory: str | Path, name: str | None = None):
        self.client, self.directory, self.name = client, Path(directory), name
        self.current: tuple[str, Path] | None = None

    def push(self, model: Any, version: int) -> None:
        """Save `model`'s adapter (a peft model) as version `version`, load it on the server, drop the previous."""
        name = self.name or f"reinforge-v{version}"
        path = self.directory / f"reinforge-v{version}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        model.save_pretrained(str(path), safe_serialization=True)
        previous, self.current = self.current, (name, path)
        self._load(name, path)
        self.client.model = name
        if previous is not None and previous[0] != name:
            self.client.unload_lora(previous[0])
        if previous is not None and previous[1] != path:
            shutil.rmtree(previous[1], ignore_errors=True)
        _reset_cache(self.client)

    def _load(self, name: str, path: Path) -> None:
        """The adapter at `path` as `name`: whatever has that name (a resumed run, the previous version under a
        fixed name) is unloaded first, then it is loaded, not in place — vLLM 0.32 re-reads an adapter loaded in
        place from its directory every time it schedules it (and its engine fails once that directory is gone)."""
        if name in self.client.lora_names():
            self.client.unload_lora(name)
        try:
            self.client.load_lora(name, str(path.resolve()), inplace=False)
        except VLLMError as exc:
            if self.name is None or "conflicts with a served base model" not in str(exc):
                raise
            raise VLLMError(f"{exc}\nthe adapter must be served under {name!r} (the name NeMo Gym's model proxy "
                            f"asks for), so the base model must be served under another name: start the server with "
                            f"`reinforge vllm-serve CONFIG` (it serves the base as {name + '-base'!r}) or pass "
                            f"--served-model-name OTHER to vLLM") from None


class FullWeightSync:
    """Full weights → a safetensors file loaded by the server's worker extension (see module docstring).

    Args: client: the server's VLLMClient; directory: where the file is written (created; use a RAM disk such
    as /dev/shm for speed); dtype: the server's floating dtype when it is not the trainer's (e.g. bfloat16): the
    tensors are cast before writing, which gives the server the values its own cast would (round to nearest)
    and halves the bytes moved; None: as trained.
    """

    needed = True

    def __init__(self, client: VLLMClient, directory: str | Path, dtype: torch.dtype | None = None):
        self.client, self.directory, self.dtype = client, Path(directory), dtype

    def push(self, model: Any, version: int) -> None:
        """Write `model`'s (merged) weights, have every worker load them, reset the prefix cache."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = (self.directory / f"v{version}.safetensors").resolve()
        weights = merged_state_dict(model)
        if self.dtype is not None:
            weights = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in weights.items()}
        save_file(weights, str(path))
        try:
            self.client.collective_rpc(LOAD_WEIGHTS_METHOD, [str(path)])
        except VLLMError as exc:
            raise VLLMError(f"{exc}\nfull-weight sync needs the server started by `reinforge vllm-serve` (it loads "
                            f"the worker extension reinforge.serving.vllm_worker and enables /collective_rpc)") from None
        finally:
            path.unlink(missing_ok=True)
        self.client.model = self.client.base_model
        _reset_cache(self.client)


def _reset_cache(client: VLLMClient) -> None:
    try:
        client.reset_prefix_cache()
    except VLLMError as exc:
        if "HTTP 404" not in str(exc):
            raise
        log.debug("the vLLM server has no /reset_prefix_cache (not started with VLLM_SERVER_DEV_MODE=1)")


@torch.no_grad()
def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The weights a plain Hugging Face model of `model`'s architecture would have, with Hugging Face names.

    A peft LoRA model gives base weight + ΔW (peft's `get_delta_weight`) for every adapted layer and its other
    weights unchanged (`modules_to_save` copies replace the originals); the training module is not modified.
    Tensors that share storage (tied embeddings) are kept once, under their first name. Contiguous CPU tensors.
    """
    peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    if peft:
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                out[f"{name}.weight"] = (weight + delta).to(weight.dtype).contiguous().cpu()
                seen.add(weight.data_ptr())
    for key, tensor in base.state_dict().items():
        if peft:
            if ".lora_" in key or ".original_module." in key:
                continue
            key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            if key in out:
                continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous().cpu()
    return out
