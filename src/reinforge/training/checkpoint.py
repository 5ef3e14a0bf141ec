"""Saving models and checkpoints atomically, finding the latest complete checkpoint, loading one back.

A checkpoint `output_dir/checkpoint-<step>/` holds:
- the model as `save_pretrained` writes it (the adapter for LoRA, else the full model), the tokenizer and
  the resolved config (`reinforge_config.yaml`): a checkpoint loads like a finished run;
- `optimizer.pt`, `scheduler.pt`, `objective_state.pt` (when the objective has `state_dict`, e.g. a running
  mean), and under DeepSpeed/FSDP the sharded states of `accelerator.save_state` instead of `optimizer.pt`;
- `rank_<r>.pt` per process: RNG states (python, numpy, torch, CUDA) and the loop's per-process state
  (metric accumulators, GRPO's in-flight rollout);
- `trainer_state.json`, written last: step, data position, counters, world size.

Everything is written into `checkpoint-<step>.tmp` and renamed into place after `trainer_state.json`, so
a crash while saving leaves only a `.tmp` directory, which is never resumed from and is deleted by the
next save. A complete checkpoint is a `checkpoint-<step>` directory containing `trainer_state.json`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from reinforge.config.schema import ReinforgeConfig

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def write_config(cfg: ReinforgeConfig, directory: Path) -> None:
    """Write the resolved config as `reinforge_config.yaml` (loadable by `reinforge train`)."""
    (directory / "reinforge_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def save_model(model, tokenizer, cfg: ReinforgeConfig, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Save the adapter (peft) or full model, the tokenizer and the resolved config into `directory`.

    Files are written into `<directory>.tmp-save` first and moved into place at the end, so an interrupted
    save never leaves a directory that looks complete. Existing files of `directory` that the save
    writes again are replaced; others (metrics.jsonl, runs/, checkpoints) are kept. `state_dict`: the
    full weights when they are sharded across processes (DeepSpeed ZeRO-3, FSDP).
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(tmp)
    write_config(cfg, tmp)
    directory.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = directory / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    tmp.rmdir()
    return directory


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` directory name, else None."""
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: str | Path) -> bool:
    """True for a checkpoint directory whose save finished (its trainer_state.json exists)."""
    path = Path(path)
    return path.is_dir() and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest (lowest step) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (python, numpy, torch CPU, CUDA when present)."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from `rng_state()`."""
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(output_dir: str | Path, step: int, *, model, tokenizer, cfg: ReinforgeConfig, optimizer, scheduler,
                    state: dict[str, Any], rank_state: dict[str, Any], objective=None, accelerator=None,
                    module=None, total_limit: int | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically (see the module docstring); every process calls this.

    Args:
        model: the unwrapped causal LM (peft or plain) — what `save_pretrained` writes.
        optimizer, scheduler: their `state_dict()` is saved (the optimizer through accelerate when sharded).
        state: JSON-serialisable run state (step, data position, counters), the same on every process.
        rank_state: this process's state (any picklable objects; RNG states are added).
        objective: saved when it has `state_dict()`.
        accelerator: None for a single process without accelerate; `module`: the prepared module (needed
            under DeepSpeed/FSDP to gather the weights).
        total_limit: keep at most this many checkpoints (oldest deleted after the new one is in place).
    Returns:
        The checkpoint directory.
    """
    from reinforge.training.distributed import is_sharded

    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    sharded = accelerator is not None and is_sharded(accelerator)
    if main:
        for stale in out.glob("checkpoint-*.tmp"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    full_state = None
    if sharded:
        accelerator.save_state(str(tmp))
        full_state = accelerator.get_state_dict(module)
        full_state = {k.removeprefix("model."): v for k, v in full_state.items()} if full_state else None
    _barrier(accelerator)
    if main:
        kwargs = {"state_dict": full_state} if full_state is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        write_config(cfg, tmp)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if hasattr(objective, "state_dict"):
            torch.save(objective.state_dict(), tmp / "objective_state.pt")
        world_size = 1 if accelerator is None else accelerator.num_processes
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "world_size": world_size}, indent=2))
        if final.exists():  # the same step saved twice (e.g. an interruption right after a scheduled save)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(out)[:-total_limit]:
                doomed = old.with_name(old.name + ".deleting")  # never looks complete while being removed
                old.rename(doomed)
                shutil.rmtree(doomed)
        log.info("checkpoint written: %s", final)
    _barrier(accelerator)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    """The `trainer_state.json` of a checkpoint. Raises FileNotFoundError for an incomplete one."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads((path / STATE_FILE).read_text())


def load_model_weights(model, path: str | Path) -> None:
    """Load the weights `save_pretrained` wrote in `path` into `model` (peft adapter or full model).

    Raises:
        RuntimeError: keys that do not match the model (a checkpoint of another model or adapter).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise RuntimeError(f"{path} has no adapter_model.safetensors, but the model has a LoRA adapter")
        result = set_peft_model_state_dict(model, load_file(file))
        if result.unexpected_keys:
            raise RuntimeError(f"{path}: adapter weights that the model does not have: {result.unexpected_keys[:5]}")
        return
    index = path / "model.safetensors.index.json"
    files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
        else [path / "model.safetensors"]
    if not files[0].is_file():
        raise RuntimeError(f"{path} has no model.safetensors (nor an index), but the model is trained in full")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in weights if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights (lm_head = embeddings) are fine
    if untied or unexpected:
        raise RuntimeError(f"{path}: checkpoint weights do not match the model (missing {untied[:5]}, "
                           f"unexpected {unexpected[:5]})")


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, objective=None,
                    accelerator=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model weights, optimizer, scheduler, objective state and this process's RNG states.

    Call after `accelerator.prepare` (the prepared optimizer; under DeepSpeed/FSDP `accelerator.load_state`
    restores the sharded model and optimizer). Returns (run state, this process's rank state).

    Raises:
        FileNotFoundError: incomplete checkpoint; RuntimeError: written by a different number of
        processes, or weights that do not match.
    """
    from reinforge.training.distributed import is_sharded

    path = Path(path)
    state = read_state(path)
    world_size = 1 if accelerator is None else accelerator.num_processes
    if state.get("world_size", 1) != world_size:
        n = state.get("world_size", 1)
        how = "one process (without --num-processes)" if n == 1 else f"{n} processes (reinforge train --num-processes {n})"
        raise RuntimeError(f"{path} was written by {n} process(es); resume it with {how}, not {world_size}")
    rank = 0 if accelerator is None else accelerator.process_index
    if accelerator is not None and is_sharded(accelerator):
        accelerator.load_state(str(path))
    else:
        load_model_weights(model, path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if hasattr(objective, "load_state_dict"):
        file = path / "objective_state.pt"
        if not file.is_file():
            raise RuntimeError(f"{path} has no objective_state.pt, but this objective keeps state (e.g. a running mean)")
        objective.load_state_dict(torch.load(file, weights_only=False))
    rank_state = torch.load(path / f"rank_{rank}.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return state, rank_state
