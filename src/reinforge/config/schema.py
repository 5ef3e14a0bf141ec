"""The configuration schema: one pydantic class per concern, Axolotl's key names.

Every class forbids unknown keys (`extra="forbid"`); `reinforge.config.loader` turns such an error
into one that names the closest valid key. Every field carries a description and its range.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from reinforge.algorithms.aggregation import LOSS_TYPES
from reinforge.algorithms.registry import METHODS, method

RLMethod = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def check_chat_template_name(value: str | None) -> str | None:
    """`value` when it is a `chat_template:` name (`reinforge.models.chat_templates.valid_names`) or None.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    from reinforge.models.chat_templates import valid_names

    if value is not None and value not in valid_names():
        raise ValueError(f"unknown chat_template {value!r}; valid: {', '.join(valid_names())}")
    return value


ChatTemplateName = Annotated[str | None, AfterValidator(check_chat_template_name)]


class StrictModel(BaseModel):
    """Base of every config class: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DatasetConfig(StrictModel):
    """One entry of `datasets:` / `test_datasets:` (Axolotl's keys)."""

    path: str | None = Field(
        default=None,
        description="Local file or directory (json, jsonl, parquet, csv, arrow) or a Hugging Face dataset name. "
        "May be left out when `data_files` names local files (Axolotl's `ds_type` + `data_files`).",
    )
    type: str | dict[str, Any] | None = Field(
        default=None,
        description="Format of the rows, e.g. `chat_template.default`, `chatml.intel`, a dict (user_defined) "
        "or `module.fn`. None: detect TRL's standard/conversational preference formats.",
    )
    split: str = Field(default="train", description="Split to load; slices such as `train[:500]` are allowed.")
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face `name`).")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow"] | None = Field(
        default=None, description="File type for local data; inferred from the extension when omitted."
    )
    data_files: str | list[str] | None = Field(
        default=None,
        description="File(s) to load from `path` (a directory or a Hub dataset). Without `path`: local files (relative "
        "to the working directory), loaded as `datasets.load_dataset(ds_type, data_files=...)` (the builder from "
        "`ds_type`, else from the first file's extension).",
    )
    # chat_template.* options
    field_messages: str | None = Field(default=None, description="Column holding the prompt conversation (list of messages).")
    field_chosen: str | None = Field(default=None, description="Column holding the chosen response (message, list of messages or string).")
    field_rejected: str | None = Field(default=None, description="Column holding the rejected response.")
    field_system: str | None = Field(default=None, description="Column holding a system prompt.")
    field_prompt: str | None = Field(default=None, description="Column holding the prompt text.")
    field_completion: str | None = Field(default=None, description="Column holding the completion (KTO).")
    field_label: str | None = Field(default=None, description="Column holding the KTO label (bool).")
    message_property_mappings: dict[str, str] | None = Field(
        default=None, description="Map from standard message keys (role, content) to the keys the data uses, e.g. {role: from, content: value}."
    )
    roles: dict[str, list[str]] | None = Field(
        default=None, description="Map from standard roles (system, user, assistant) to the role names the data uses, e.g. {user: [human], assistant: [gpt]}."
    )
    chat_template: ChatTemplateName = Field(default=None, description="Per-dataset chat template override (as the top-level `chat_template`).")
    remove_columns: str | list[str] | None = Field(default=None, description="Columns to drop after a `module.fn` transform; `__all__` drops all original columns.")

    @model_validator(mode="after")
    def _path_or_files(self) -> "DatasetConfig":
        if self.path is None and not self.data_files:
            raise ValueError("a dataset needs `path` (a file, directory or Hub name) or `data_files` (local files, "
                             "with `ds_type` or a known extension)")
        return self


from reinforge.config.async_grpo import AsyncGRPOKeys  # noqa: E402
from reinforge.config.ebft import EBFTConfig  # noqa: E402
from reinforge.config.vllm import VLLMServerConfig, VLLMTrainerKeys  # noqa: E402


class TRLConfig(AsyncGRPOKeys, VLLMTrainerKeys, StrictModel):
    """The `trl:` section (Axolotl/TRL names): online RL (GRPO/GDPO) settings and shared knobs."""

    beta: float | None = Field(default=None, ge=0.0, description="KL coefficient for GRPO (0: no reference model); for DPO-family an alias of `rl_beta`.")
    num_generations: int = Field(default=8, ge=2, description="Completions sampled per prompt (GRPO group size).")
    generation_batch_size: int | None = Field(default=None, ge=1, description="Completions generated per rollout batch; must be divisible by num_generations.")
    max_completion_length: int = Field(default=256, ge=1, description="Maximum new tokens per completion (a key without a value, null, means the default, as in Axolotl).")
    max_prompt_length: int | None = Field(default=None, ge=1, description="Prompts longer than this (tokens) are truncated from the left.")
    temperature: float = Field(default=1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int | None = Field(default=None, ge=0, description="Top-k sampling (None/0: off).")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="Min-p sampling threshold.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="Repetition penalty for sampling.")
    generation_kwargs: dict[str, Any] | None = Field(default=None, description="Extra keyword arguments for the generator.")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="Extra keyword arguments for apply_chat_template on prompts.")
    reward_funcs: list[str] | None = Field(default=None, description="Reward functions as `module.fn` strings.")
    reward_weights: list[float] | None = Field(default=None, description="One weight per reward function (default all 1).")
    scale_rewards: Literal["group", "batch", "none"] | bool = Field(default="group", description="Std used to scale advantages: per group, over the batch, or none (True=group, False=none).")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        default="sum_then_normalize", description="How several rewards become one advantage; `rl: gdpo` sets normalize_then_sum."
    )
    loss_type: str = Field(default="dapo", description="Policy loss (TRL 1.16): grpo, bnpo, dr_grpo, dapo, luspo (the clipped surrogate, aggregated differently), cispo, sapo or vespo.")
    sapo_temperature_pos: float = Field(default=1.0, gt=0.0, description="SAPO's gate temperature for positive advantages (loss_type: sapo).")
    sapo_temperature_neg: float = Field(default=1.05, gt=0.0, description="SAPO's gate temperature for negative advantages (loss_type: sapo).")
    vespo_k_pos: float = Field(default=2.0, description="VESPO's gamma-kernel shape k for non-negative advantages (loss_type: vespo).")
    vespo_lambda_pos: float = Field(default=3.0, description="VESPO's gamma-kernel rate λ for non-negative advantages.")
    vespo_k_neg: float = Field(default=3.0, description="VESPO's gamma-kernel shape k for negative advantages.")
    vespo_lambda_neg: float = Field(default=2.0, description="VESPO's gamma-kernel rate λ for negative advantages.")
    epsilon: float = Field(default=0.2, ge=0.0, description="Lower clipping range of the importance ratio.")
    epsilon_high: float | None = Field(default=None, ge=0.0, description="Upper clipping range (default: epsilon).")
    num_iterations: int = Field(default=1, ge=1, description="Optimisation passes over one rollout batch.")
    importance_sampling_level: Literal["token", "sequence"] = Field(default="token", description="Importance ratio per token, or per sequence (GSPO).")
    mask_truncated_completions: bool = Field(default=False, description="Exclude completions that hit max_completion_length from the loss.")
    log_completions: bool = Field(default=False, description="Print and save prompt/completion/reward tables every logging step.")
    num_completions_to_print: int | None = Field(default=None, ge=1, description="Rows of the completions table to print.")
    rollout_func: str | None = Field(default=None, description="`module.fn` that replaces generation.")
    reward_num_workers: int = Field(default=1, ge=1, description="Processes scoring rewards (>1: a subprocess pool).")
    reward_timeout: float | None = Field(default=None, gt=0.0, description="Per-call timeout (s) for reward functions in the worker pool.")

    @field_validator("max_completion_length", mode="before")
    @classmethod
    def _null_completion_length(cls, value: Any) -> Any:
        return 256 if value is None else value  # Axolotl's docs write `max_completion_length:` for "the default"


class GradientCheckpointingKwargs(StrictModel):
    """`gradient_checkpointing_kwargs:` — keyword arguments of `torch.utils.checkpoint.checkpoint` (Axolotl's key)."""

    use_reentrant: bool = Field(
        default=False,
        description="Reentrant (autograd.Function) checkpointing instead of the non-reentrant one; Axolotl's docs ask "
        "for true with DeepSpeed ZeRO-3 and flex attention. With a LoRA adapter the embeddings' output is made to "
        "require grad (as for non-reentrant), so that the checkpointed layers get a gradient.",
    )
    preserve_rng_state: bool | None = Field(default=None, description="Restore the RNG state when recomputing (dropout is the same); torch's default true.")
    determinism_check: Literal["default", "none"] | None = Field(default=None, description="Non-reentrant only: compare recomputed tensors' metadata (`default`) or not (`none`); torch's default `default`.")
    debug: bool | None = Field(default=None, description="Non-reentrant only: trace recomputed operators for error messages; torch's default false.")

    def as_kwargs(self) -> dict[str, Any]:
        """The set arguments as a dict for `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


from reinforge.config.nemo_gym import NemoGymKeys  # noqa: E402
from reinforge.config.performance import PerformanceKeys  # noqa: E402
from reinforge.config.preference import PreferenceKeys  # noqa: E402
from reinforge.config.run import RunKeys  # noqa: E402


class ReinforgeConfig(NemoGymKeys, PreferenceKeys, PerformanceKeys, RunKeys, StrictModel):
    """A whole training run. Keys follow Axolotl; see docs/config.md."""

    # --- model ---
    base_model: str = Field(description="Hugging Face directory, Hub id (offline when cached) or a `.gguf` file.")
    tokenizer_config: str | None = Field(default=None, description="Tokenizer directory/id, if not the model's own.")
    chat_template: ChatTemplateName = Field(
        default=None,
        description="`tokenizer_default` (the tokenizer's own), `chatml`, `llama3`, ... or `jinja` with `chat_template_jinja`.",
    )
    chat_template_jinja: str | None = Field(default=None, description="A Jinja chat template, used with `chat_template: jinja`.")
    ref_model: str | None = Field(default=None, description="Path/id of a different reference model (the policy's vocabulary), loaded separately and frozen; used instead of the default reference, with or without an adapter.")
    rl_adapter_ref_model: bool = Field(default=False, description="With an adapter and no ref_model: load base_model again as a separate frozen reference instead of disabling the adapter (the same numbers, the weights twice in memory).")
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="Compute reference log-probs once before training (cached on disk, keyed by data and model) "
        "instead of a reference forward every step; no reference model is kept during training.",
    )

    # --- method ---
    rl: RLMethod = Field(description="Training method: dpo, ipo, kto, orpo, simpo, grpo, gdpo or ebft.")
    rl_beta: float | None = Field(default=None, gt=0.0, description="Temperature β of the preference loss (default 0.1; SimPO 2.0).")
    trl: TRLConfig = Field(default_factory=TRLConfig, description="TRL-style settings (online RL and shared knobs).")
    ebft: EBFTConfig = Field(default_factory=EBFTConfig, description="EBFT feature-matching settings (rl: ebft; Axolotl's `ebft:` keys).")
    vllm: VLLMServerConfig = Field(default_factory=VLLMServerConfig, description="The vLLM server `reinforge vllm-serve` starts (Axolotl's `vllm:` keys).")

    # --- data ---
    datasets: list[DatasetConfig] = Field(min_length=1, description="Training datasets, mixed in order.")
    test_datasets: list[DatasetConfig] | None = Field(default=None, description="Evaluation datasets (instead of `val_set_size`).")
    val_set_size: float = Field(default=0.0, ge=0.0, description="Held-out eval split: a fraction in (0, 1) or a row count >= 1.")
    sequence_len: int = Field(default=2048, ge=8, description="Maximum tokens of prompt+completion per sequence.")
    excess_length_strategy: Literal["truncate", "drop", "raise"] = Field(default="truncate", description="What to do with a sequence longer than sequence_len.")
    truncation_mode: Literal["keep_start", "keep_end"] = Field(default="keep_end", description="Which end of an over-long prompt is kept.")
    shuffle_merged_datasets: bool = Field(default=True, description="Shuffle the rows after mixing datasets.")
    dataset_prepared_path: str | None = Field(default=None, description="Directory of the prepared-dataset cache (default ~/.cache/reinforge/prepared).")
    dataset_exact_deduplication: bool = Field(
        default=False,
        description="Drop rows whose formatted record (prompt and responses) repeats an earlier one; evaluation rows "
        "that also appear in the training data are dropped too. The count is reported.",
    )

    # --- batch and schedule ---
    micro_batch_size: int = Field(default=1, ge=1, description="Rows (pairs, examples or prompts) per forward pass per process.")
    eval_batch_size: int | None = Field(default=None, ge=1, description="Rows per eval forward (default micro_batch_size).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimiser step.")
    num_epochs: float = Field(default=1.0, gt=0.0, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps (overrides num_epochs).")
    learning_rate: float = Field(default=5e-6, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "polynomial"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warm-up steps (exclusive with warmup_ratio).")
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0, description="Warm-up as a fraction of total steps.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw", "adam", "sgd", "adafactor"] = Field(
        default="adamw_torch", description="Optimiser."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="Decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW β1.")
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0, description="AdamW β2.")
    adam_epsilon: float = Field(default=1e-8, gt=0.0, description="AdamW ε.")
    max_grad_norm: float | None = Field(default=1.0, ge=0.0, description="Clip the gradient norm to this (None or 0: no clipping).")

    # --- adapter ---
    adapter: Literal["lora", "qlora"] | None = Field(default=None, description="Train a LoRA (or QLoRA) adapter instead of all weights.")
    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA scaling α.")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str | None = Field(default=None, description="Module names to adapt (e.g. [q_proj, v_proj]).")
    lora_target_linear: bool = Field(default=False, description="Adapt every linear layer except the LM head.")
    lora_modules_to_save: list[str] | None = Field(default=None, description="Modules trained in full and saved with the adapter.")

    # --- precision and memory ---
    bf16: bool | Literal["auto"] = Field(default=False, description="Train in bfloat16 mixed precision (auto: when supported).")
    fp16: bool = Field(default=False, description="Train in float16 mixed precision (GPU only).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    gradient_checkpointing_kwargs: GradientCheckpointingKwargs | None = Field(
        default=None,
        description="Arguments of `torch.utils.checkpoint` passed to transformers' `gradient_checkpointing_enable` "
        "(see `gradient_checkpointing_kwargs.*`); only with gradient_checkpointing: true. Default use_reentrant: false.",
    )
    flash_attention: bool = Field(
        default=False,
        description="Load the model with FlashAttention-2 (transformers `attn_implementation: flash_attention_2`). "
        "Needs a CUDA GPU and the flash-attn package: `validate` and `train` refuse it without a GPU. Default: sdpa.",
    )
    flex_attention: bool = Field(
        default=False,
        description="Load the model with PyTorch FlexAttention (transformers `attn_implementation: flex_attention`; "
        "Axolotl's strided EBFT uses it for the block mask, which reinforge builds as a 4-D mask for sdpa instead, so "
        "strided mode does not need it). Needs a CUDA GPU (FlexAttention has no backward on CPU): `validate` and "
        "`train` refuse it without one. Not with flash_attention.",
    )
    context_parallel_size: int = Field(
        default=1, ge=1,
        description="GPUs one sequence is split over (Axolotl's sequence/context parallelism, ring attention). "
        "Only 1 (no splitting) is accepted: reinforge has no context parallelism.",
    )
    remove_unused_columns: bool | None = Field(
        default=None,
        description="Axolotl/TRL's switch to keep dataset columns the model's forward does not take (ORPO and KTO need "
        "false there). Accepted, and the same for either value: reinforge's dataset formats always keep exactly the "
        "columns the method needs (prompt/chosen/rejected, prompt/completion/label, and for GRPO/GDPO the columns "
        "the reward functions read) and drop the rest.",
    )

    # --- output, logging, evaluation ---
    output_dir: str = Field(default="./outputs", description="Where checkpoints, metrics and the final model go.")
    overwrite_output_dir: bool = Field(default=False, description="Allow writing into a non-empty output_dir.")
    logging_steps: int = Field(default=1, ge=1, description="Log training metrics every N optimiser steps.")
    eval_steps: int | None = Field(default=None, ge=1, description="Evaluate every N steps (also before the first and after the last).")
    save_steps: int | None = Field(default=None, ge=1, description="Write a checkpoint every N steps.")
    seed: int = Field(default=42, ge=0, description="Random seed (data order, initialisation, sampling).")
    use_tensorboard: bool = Field(default=True, description="Also write metrics to TensorBoard under output_dir/runs.")

    @model_validator(mode="after")
    def _check(self) -> "ReinforgeConfig":
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set either warmup_steps or warmup_ratio, not both")
        if self.bf16 is True and self.fp16:
            raise ValueError("set either bf16 or fp16, not both")
        if self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size):
            raise ValueError("val_set_size must be a fraction in (0, 1) or a whole row count >= 1")
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError("chat_template: jinja needs chat_template_jinja")
        if self.chat_template_jinja and self.chat_template not in (None, "jinja"):
            raise ValueError("chat_template_jinja is used only with chat_template: jinja")
        if self.gradient_checkpointing_kwargs is not None and not self.gradient_checkpointing:
            raise ValueError("gradient_checkpointing_kwargs is used only with gradient_checkpointing: true; set it or "
                             "remove the kwargs")
        if self.flash_attention and self.flex_attention:
            raise ValueError("set either flash_attention or flex_attention, not both")
        if self.context_parallel_size > 1:
            raise ValueError(f"context_parallel_size: {self.context_parallel_size} needs sequence parallelism over "
                             f"several GPUs (ring attention), which reinforge does not implement; use 1")
        spec = method(self.rl)
        if not spec.implemented:
            raise ValueError(f"rl: {self.rl} is not implemented yet ({spec.note}); it is refused rather than run as "
                             f"another method")
        if self.precompute_ref_log_probs and self.rl not in ("dpo", "ipo"):
            raise ValueError(f"precompute_ref_log_probs is supported for rl: dpo and ipo (paired methods with a "
                             f"reference), not rl: {self.rl}")
        if "ebft" in self.model_fields_set and spec.rewards != "feature_matching":
            raise ValueError(f"the ebft: section is used only with rl: ebft, not rl: {self.rl}; remove it")
        if spec.online:
            self._check_online()
        else:
            if self.rl_beta is not None and self.trl.beta is not None and self.rl_beta != self.trl.beta:
                raise ValueError(f"rl_beta={self.rl_beta} and trl.beta={self.trl.beta} disagree; set one")
        return self

    def _check_online(self) -> None:
        t = self.trl
        if t.loss_type not in LOSS_TYPES:
            raise ValueError(f"trl.loss_type {t.loss_type!r} is unknown; valid: {', '.join(LOSS_TYPES)}")
        if not t.use_vllm and t.snapshot_sampler and t.generation_kwargs:
            raise ValueError(f"trl.generation_kwargs ({sorted(t.generation_kwargs)}) are generate() arguments; the "
                             f"snapshot sampler (inprocess_sampler: snapshot, or async_prefetch) does not take them")
        if t.loss_type == "cispo" and t.epsilon_high is None:
            raise ValueError("loss_type: cispo caps the importance ratio at trl.epsilon_high (an absolute cap, not "
                             "1 + ε); set it (TRL's docs suggest 5.0; TRL would silently use epsilon, 0.2)")
        if t.loss_type == "vespo" and (t.use_vllm or t.async_prefetch) and t.vllm_importance_sampling_correction \
                and t.vllm_importance_sampling_mode.startswith("sequence"):
            raise ValueError("loss_type: vespo needs per-token sampler weights: set trl.vllm_importance_sampling_mode "
                             "to token_truncate or token_mask")
        spec = method(self.rl)
        if spec.rewards == "feature_matching":
            self._check_ebft()
            if self.ebft.mode == "strided":  # its own loop: documents per micro-batch, no generation batch
                return
        elif not t.reward_funcs and not t.rollout_func:
            raise ValueError(f"rl: {self.rl} needs trl.reward_funcs (a list of `module.fn`)")
        n_funcs = len(t.reward_funcs or [])
        if t.reward_weights is not None and len(t.reward_weights) != n_funcs:
            raise ValueError(f"trl.reward_weights has {len(t.reward_weights)} entries for {n_funcs} reward_funcs")
        size = t.generation_batch_size or self.micro_batch_size * self.gradient_accumulation_steps
        if size % t.num_generations:
            raise ValueError(f"the generation batch ({size} completions = trl.generation_batch_size, or "
                             f"micro_batch_size × gradient_accumulation_steps) must be divisible by "
                             f"trl.num_generations ({t.num_generations})")
        if size % self.micro_batch_size:
            raise ValueError(f"trl.generation_batch_size ({size}) must be divisible by micro_batch_size ({self.micro_batch_size})")
        if t.vllm_lora_sync and not self.adapter:
            raise ValueError("trl.vllm_lora_sync syncs a LoRA adapter, but this config trains all weights (no adapter); "
                             "remove vllm_lora_sync (full weights are synced)")

    def _check_ebft(self) -> None:
        e, t = self.ebft, self.trl
        if t.reward_funcs:
            raise ValueError("rl: ebft rewards completions by feature matching against each row's ground_truth; "
                             "remove trl.reward_funcs (or use rl: grpo)")
        if e.mode == "strided":
            if t.use_vllm or t.async_prefetch:
                raise ValueError("ebft.mode: strided generates its blocks in-process (one sequence, a block "
                                 "attention mask); remove trl.use_vllm / trl.async_prefetch")
            return

    @property
    def lora_sync(self) -> bool:
        """Whether a vLLM server gets the adapter (runtime LoRA) rather than merged full weights."""
        return bool(self.adapter) and self.trl.vllm_lora_sync is not False

    @property
    def beta(self) -> float:
        """β of the preference loss: `rl_beta`, else `trl.beta`, else 0.1."""
        if self.rl_beta is not None:
            return self.rl_beta
        if self.trl.beta is not None:
            return self.trl.beta
        return 0.1
