"""Config keys of the exact speed-ups: packing, prefix sharing, chunked log-probs.

Mixed into `ReinforgeConfig`. Each optimisation leaves the per-sequence log-probs, the loss and the
gradients unchanged up to floating-point rounding (tests/unit/test_packing_equivalence.py), so each is
on by default where it applies and can be switched off. The effective values are the `*_value`
properties; `reinforge.data.packing.build_collator` and `reinforge.models.forward.LogpsModel` read them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reinforge.algorithms.registry import packing_methods  # noqa: E402

PACKING_METHODS = packing_methods()


class PerformanceKeys(BaseModel):
    """Layout of training batches and the log-prob computation (Axolotl's `sample_packing` name)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    sample_packing: bool | None = Field(
        default=None,
        description="Pack the sequences of a micro-batch into rows without padding (position ids restart per "
        "sequence, attention stays inside each sequence). The micro-batch keeps micro_batch_size pairs/examples, so "
        "the result is unchanged. Default: on for dpo, ipo, kto, orpo, simpo, grpo, gdpo (the methods it applies "
        "to; grpo/gdpo: the completions of a micro-batch).",
    )
    packing_length: int | None = Field(
        default=None, ge=8,
        description="Tokens per packed row (first-fit-decreasing bin-packing; a longer unit gets its own row). "
        "Default: no limit, one row per micro-batch, no padding at all; with sdpa attention (the default) "
        "attention is computed per sequence, so row length does not change its cost. Set it (e.g. to "
        "sequence_len) for models whose attention uses a dense row × row mask (eager attention, sliding "
        "windows). Only with sample_packing.",
    )
    prefix_sharing: bool | None = Field(
        default=None,
        description="Compute each prompt once for all the sequences that continue it (chosen and rejected; a KTO "
        "example and its KL sequence; the completions of one prompt in a grpo/gdpo micro-batch): the "
        "continuations attend to the shared prompt and not to each other (arXiv 2410.20305). Default: on for "
        "dpo, ipo, kto, orpo, simpo, grpo, gdpo. Needs full causal attention (no sliding window) and sdpa or "
        "eager attention.",
    )
    chunked_logprobs: bool = Field(
        default=True,
        description="Apply the LM head and log-softmax to completion positions only, in chunks recomputed in "
        "backward, so the [tokens, vocab] logits tensor never exists. false: the model's full-logits forward.",
    )

    @model_validator(mode="after")
    def check_performance_keys(self) -> "PerformanceKeys":
        """sample_packing/prefix_sharing only for PACKING_METHODS; packing_length only with packing."""
        rl = getattr(self, "rl", None)
        for key in ("sample_packing", "prefix_sharing"):
            if getattr(self, key) and rl is not None and rl not in PACKING_METHODS:
                raise ValueError(f"{key} applies to rl: {' / '.join(PACKING_METHODS)}, not rl: {rl}; remove it")
        if self.packing_length is not None and self.sample_packing is False:
            raise ValueError("packing_length is used only with sample_packing; remove it or set sample_packing: true")
        if self.packing_length is not None and rl is not None and rl not in PACKING_METHODS:
            raise ValueError(f"packing_length applies to rl: {' / '.join(PACKING_METHODS)}, not rl: {rl}; remove it")
        return self

    @property
    def sample_packing_value(self) -> bool:
        """Whether batches are packed: `sample_packing`, else on for PACKING_METHODS."""
        if self.sample_packing is not None:
            return self.sample_packing
        return getattr(self, "rl", None) in PACKING_METHODS

    @property
    def prefix_sharing_value(self) -> bool:
        """Whether prompts are shared: `prefix_sharing`, else on for PACKING_METHODS."""
        if self.prefix_sharing is not None:
            return self.prefix_sharing
        return getattr(self, "rl", None) in PACKING_METHODS

    @property
    def packing_length_value(self) -> int | None:
        """Tokens per packed row, None = no limit (one row per micro-batch)."""
        return self.packing_length
