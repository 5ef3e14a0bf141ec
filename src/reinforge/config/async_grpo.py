"""Config keys of async GRPO and of the data producer's extras (Axolotl's names and defaults, under `trl:`):
background prefetch, staleness, off-policy masking, streaming scoring, zero-advantage skipping, the replay
buffer and deferred re-rolls. See docs/async_grpo.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AsyncGRPOKeys(BaseModel):
    """`trl.use_data_producer`, `trl.async_prefetch` and the keys that go with them (mixed into `trl:`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    inprocess_sampler: Literal["policy", "snapshot"] | None = Field(default=None, description="Without vLLM: `policy` samples with generate() on the training module itself (synchronous only); `snapshot` samples from a frozen merged copy of the weights, refreshed every vllm_sync_interval steps, returning sampler log-probs (thread-safe; faster with a LoRA policy). Default: policy, snapshot with async_prefetch.")
    inprocess_sampler_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="dtype of the snapshot sampler's copy (bfloat16 samples faster on CPUs with bf16; the importance-sampling correction covers the mismatch).")
    use_data_producer: bool = Field(default=False, description="Axolotl's switch for the data-producer features: async_prefetch, streaming_partial_batch, the replay buffer and re-rolls need it (reinforge always produces rollouts through its producer).")
    async_prefetch: bool = Field(default=False, description="Produce the next rollouts in a background thread while the current one trains (needs use_data_producer).")
    prefetch_depth: int = Field(default=1, ge=1, description="Rollouts produced ahead of training when async_prefetch is on.")
    max_staleness: int | None = Field(default=None, ge=0, description="Drop a prefetched rollout sampled more than this many optimiser steps ago and sample it again (TRL's async trainer); default keep all.")
    off_policy_mask_threshold: float | None = Field(default=None, ge=0.0, description="Off-policy sequence masking (DeepSeek-V3.2): drop a sequence whose advantage is negative and whose mean (sampler - current) log-prob gap exceeds this (nats); default off.")
    use_bias_correction_kl: bool = Field(default=False, description="Multiply the per-token KL term by the importance ratio pi_theta/pi_old too (TRL 1.16).")
    streaming_partial_batch: bool = Field(default=False, description="Score prompt groups as their completions finish, overlapping scoring with generation (needs use_data_producer).")
    streaming_min_groups: int = Field(default=1, ge=1, description="Finished prompt groups scored together when streaming_partial_batch is on.")
    skip_zero_advantage_batches: bool = Field(default=True, description="A micro-batch whose advantages are all zero does no forward or backward (only when beta = 0: with a KL term it still has a gradient); logged as skipped_zero_adv_batches.")
    replay_buffer_size: int = Field(default=0, ge=0, description="Prompt groups with learning signal kept to replace zero-signal groups of later rollouts (0: off; needs use_data_producer).")
    replay_recompute_logps: bool = Field(default=True, description="Old-policy log-probs of a replayed group are recomputed with the current policy (else the ones saved with it are used).")
    reroll_start_fraction: float = Field(default=1.0, ge=0.0, le=1.0, description="From step fraction x max_steps on, prompts whose completions all scored 0 are sampled again in later rollouts (1.0: off; needs use_data_producer).")
    reroll_max_groups: int = Field(default=1, ge=1, description="Buffered prompts re-injected per rollout at most.")

    @model_validator(mode="after")
    def check_async_keys(self) -> "AsyncGRPOKeys":
        if not self.use_data_producer:
            needs = [k for k, on in (("async_prefetch", self.async_prefetch),
                                     ("streaming_partial_batch", self.streaming_partial_batch),
                                     ("replay_buffer_size", self.replay_buffer_size > 0),
                                     ("reroll_start_fraction", self.reroll_start_fraction < 1.0)) if on]
            if needs:
                raise ValueError(f"trl.{', trl.'.join(needs)} need trl.use_data_producer: true (as in Axolotl)")
        if self.async_prefetch and self.inprocess_sampler == "policy":
            raise ValueError("trl.inprocess_sampler: policy samples with the training module itself, which cannot run "
                             "in a background thread; async_prefetch needs inprocess_sampler: snapshot (the default) "
                             "or use_vllm")
        return self

    @property
    def snapshot_sampler(self) -> bool:
        """Whether in-process generation samples from a snapshot copy of the weights."""
        return (self.inprocess_sampler or ("snapshot" if self.async_prefetch else "policy")) == "snapshot"

    @property
    def reroll_enabled(self) -> bool:
        return self.use_data_producer and self.reroll_start_fraction < 1.0
