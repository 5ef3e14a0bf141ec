"""Config keys of a run's life cycle: checkpoints, resume, non-finite steps, multi-process back-ends, trackers.

Mixed into `ReinforgeConfig` (Axolotl's key names where Axolotl has them). `save_steps`, `output_dir`,
`overwrite_output_dir`, `seed` and `use_tensorboard` live in the schema itself; the checks that combine
them with the keys here are in `check_run_keys`. Effective values (defaults applied) are the `*_value`
properties. Kept free of torch so that loading a config stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reinforge.algorithms.registry import method

# Axolotl's `fsdp:` list items (HF TrainingArguments' names) → accelerate FullyShardedDataParallelPlugin kwargs.
FSDP_OPTIONS: dict[str, dict[str, Any]] = {
    "full_shard": {"sharding_strategy": "FULL_SHARD"},
    "shard_grad_op": {"sharding_strategy": "SHARD_GRAD_OP"},
    "hybrid_shard": {"sharding_strategy": "HYBRID_SHARD"},
    "no_shard": {"sharding_strategy": "NO_SHARD"},
    "offload": {"cpu_offload": True},
    "auto_wrap": {"auto_wrap_policy": "transformer_based_wrap"},
}
# Axolotl's `fsdp_config:` keys (with or without the `fsdp_` prefix) → accelerate plugin kwargs.
FSDP_CONFIG_KEYS: dict[str, str] = {
    "version": "fsdp_version", "offload_params": "cpu_offload", "state_dict_type": "state_dict_type",
    "auto_wrap_policy": "auto_wrap_policy", "transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    "reshard_after_forward": "reshard_after_forward", "sync_module_states": "sync_module_states",
    "use_orig_params": "use_orig_params", "cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "activation_checkpointing": "activation_checkpointing", "sharding_strategy": "sharding_strategy",
    "backward_prefetch": "backward_prefetch", "forward_prefetch": "forward_prefetch",
    "min_num_params": "min_num_params", "limit_all_gathers": "limit_all_gathers",
}


def fsdp_plugin_kwargs(fsdp: list[str] | str | bool | None, fsdp_config: dict[str, Any] | None) -> dict[str, Any]:
    """accelerate `FullyShardedDataParallelPlugin` keyword arguments from Axolotl's `fsdp` / `fsdp_config`.

    Raises:
        ValueError: an unknown `fsdp` option or `fsdp_config` key (naming the valid ones).
    """
    out: dict[str, Any] = {}
    items = [] if fsdp in (None, True, False) else ([fsdp] if isinstance(fsdp, str) else list(fsdp))
    for item in items:
        for word in str(item).split():
            if word not in FSDP_OPTIONS:
                raise ValueError(f"unknown fsdp option {word!r}; valid: {', '.join(FSDP_OPTIONS)}")
            out.update(FSDP_OPTIONS[word])
    for key, value in (fsdp_config or {}).items():
        name = key[len("fsdp_"):] if key.startswith("fsdp_") else key
        if name not in FSDP_CONFIG_KEYS:
            raise ValueError(f"unknown fsdp_config key {key!r}; valid (with or without the fsdp_ prefix): "
                             + ", ".join(FSDP_CONFIG_KEYS))
        target = FSDP_CONFIG_KEYS[name]
        if target == "auto_wrap_policy" and isinstance(value, str):
            value = value.lower()
        if target == "transformer_cls_names_to_wrap" and isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        out[target] = value
    if "sharding_strategy" in out:  # accelerate's current name: reshard_after_forward (a strategy for FSDP1)
        strategy = out.pop("sharding_strategy")
        if out.get("fsdp_version", 1) == 2:
            # FSDP2 has no strategies: full_shard = reshard parameters after forward, shard_grad_op = keep them
            if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
                raise ValueError(f"fsdp {strategy.lower()} is not available with fsdp_version: 2 (full_shard or "
                                 f"shard_grad_op)")
            strategy = strategy == "FULL_SHARD"
        out.setdefault("reshard_after_forward", strategy)
    return out


class RunKeys(BaseModel):
    """Keys for checkpoints, resume, non-finite steps, DeepSpeed/FSDP pass-through and experiment trackers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- checkpoints and resume ---
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(
        default=None,
        description="When to write checkpoints: every `save_steps` steps, at the end of every epoch, or never "
        "(an interrupted run still writes one). Default: steps when save_steps is set, else no.",
    )
    save_total_limit: int | None = Field(
        default=None, ge=1,
        description="Keep at most this many checkpoints in output_dir (the oldest are deleted). Default: keep all.",
    )
    resume_from_checkpoint: str | bool | None = Field(
        default=None,
        description="Continue a run exactly from a checkpoint directory, or `true` for the latest complete "
        "checkpoint in output_dir. The same batches follow in the same order.",
    )
    max_consecutive_nonfinite_steps: int = Field(
        default=5, ge=1,
        description="A step whose loss or gradient is NaN/inf is skipped and counted (skipped_nonfinite_steps); "
        "after this many such steps in a row the run stops with an error naming the step and its rows.",
    )

    # --- multi-process back-ends (passed to accelerate; need GPUs) ---
    deepspeed: str | dict[str, Any] | None = Field(
        default=None,
        description="DeepSpeed config: a JSON file path (Axolotl's key) or a mapping. `auto` values are filled "
        "from micro_batch_size, gradient_accumulation_steps, max_grad_norm and the precision keys.",
    )
    fsdp: list[str] | str | bool | None = Field(
        default=None,
        description="Fully sharded data parallel: true, or HF/Axolotl options such as [full_shard, auto_wrap].",
    )
    fsdp_config: dict[str, Any] | None = Field(
        default=None,
        description="FSDP settings (Axolotl's keys, with or without the fsdp_ prefix): version, offload_params, "
        "state_dict_type, auto_wrap_policy, transformer_layer_cls_to_wrap, reshard_after_forward, ... "
        "Setting it enables FSDP.",
    )

    # --- experiment trackers (metrics always go to output_dir/metrics.jsonl) ---
    use_wandb: bool | None = Field(
        default=None, description="Log to Weights & Biases (default: on when wandb_project is set, as Axolotl).")
    wandb_project: str | None = Field(default=None, description="W&B project (default `reinforge`).")
    wandb_entity: str | None = Field(default=None, description="W&B entity (team or user).")
    wandb_name: str | None = Field(default=None, description="W&B run name.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="W&B mode; `offline` writes under output_dir/wandb for a later `wandb sync`.")
    use_mlflow: bool | None = Field(
        default=None, description="Log to MLflow (default: on when mlflow_experiment_name is set).")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (e.g. file:./mlruns).")
    mlflow_experiment_name: str | None = Field(default=None, description="MLflow experiment (default `reinforge`).")
    mlflow_run_name: str | None = Field(default=None, description="MLflow run name.")
    use_trackio: bool = Field(default=False, description="Log to trackio.")
    trackio_project: str | None = Field(default=None, description="trackio project (default `reinforge`).")
    trackio_run_name: str | None = Field(default=None, description="trackio run name.")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_json(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str):
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"deepspeed config file {value} does not exist")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"deepspeed config {value} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError(f"deepspeed config {value} must hold a JSON object")
            _check_zero(data, value)
        elif isinstance(value, dict):
            _check_zero(value, "deepspeed")
        return value

    # ---- effective values ----
    @property
    def save_strategy_value(self) -> str:
        """"steps", "epoch" or "no" (default: steps when save_steps is set)."""
        if self.save_strategy is not None:
            return self.save_strategy
        return "steps" if getattr(self, "save_steps", None) else "no"

    @property
    def use_wandb_value(self) -> bool:
        return self.use_wandb if self.use_wandb is not None else self.wandb_project is not None

    @property
    def use_mlflow_value(self) -> bool:
        return self.use_mlflow if self.use_mlflow is not None else self.mlflow_experiment_name is not None

    @property
    def fsdp_enabled(self) -> bool:
        return bool(self.fsdp) or self.fsdp_config is not None

    @property
    def deepspeed_dict(self) -> dict[str, Any] | None:
        """The DeepSpeed config as a mapping (read from the file when a path was given)."""
        if isinstance(self.deepspeed, str):
            return json.loads(Path(self.deepspeed).expanduser().read_text())
        return dict(self.deepspeed) if self.deepspeed is not None else None

    @model_validator(mode="after")
    def check_run_keys(self) -> "RunKeys":
        """Cross-field checks with schema keys (save_steps, overwrite_output_dir)."""
        save_steps = getattr(self, "save_steps", None)
        if self.save_strategy == "steps" and not save_steps:
            raise ValueError("save_strategy: steps needs save_steps (checkpoint every N steps)")
        if self.save_strategy in ("epoch", "no") and save_steps:
            raise ValueError(f"save_steps is used only with save_strategy: steps (this config has save_strategy: "
                             f"{self.save_strategy}); remove one")
        if self.resume_from_checkpoint is not None and self.resume_from_checkpoint is not False \
                and getattr(self, "overwrite_output_dir", False):
            raise ValueError("resume_from_checkpoint continues the run in output_dir, but overwrite_output_dir: true "
                             "would delete it first; remove overwrite_output_dir to resume")
        if self.resume_from_checkpoint == "":
            raise ValueError("resume_from_checkpoint is empty: give a checkpoint directory or true")
        if self.deepspeed is not None and self.fsdp_enabled:
            raise ValueError("set either deepspeed or fsdp/fsdp_config, not both")
        if self.fsdp is False and self.fsdp_config is not None:
            raise ValueError("fsdp: false but fsdp_config is set; remove one")
        fsdp_plugin_kwargs(self.fsdp, self.fsdp_config)  # unknown options are errors now, not at launch
        rl = getattr(self, "rl", None)
        if rl is not None and method(rl).online and (self.fsdp_enabled or _zero_stage(self.deepspeed_dict) == 3):
            how = ("syncs the policy's weights to the vLLM server" if getattr(getattr(self, "trl", None), "use_vllm", False)
                   else "generates with the policy in-process")
            raise ValueError(f"rl: {rl} {how}, which needs whole (not sharded) weights: FSDP and DeepSpeed ZeRO-3 are "
                             "not supported for online methods yet; use ZeRO-1/2 or plain data parallelism")
        return self


def _zero_stage(data: dict[str, Any] | None) -> Any:
    return ((data or {}).get("zero_optimization") or {}).get("stage", 0)


def _check_zero(data: dict[str, Any], source: str) -> None:
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        raise ValueError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
