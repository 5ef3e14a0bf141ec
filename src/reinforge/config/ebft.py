"""The `ebft:` section (Axolotl's keys and defaults): energy-based fine-tuning by feature matching
(arXiv 2603.12248), structured (prompt + ground truth, generated like GRPO) or strided (unstructured text,
block-parallel generation). See docs/ebft.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EMBED_METHODS = ("last_token", "mean_pooling", "completion_mean", "concat")
ESTIMATORS = ("rloo", "group_norm", "grpo", "reinforce")


class EBFTConfig(BaseModel):
    """EBFT settings; structured mode also reads the `trl:` generation keys (num_generations, max_completion_length,
    temperature, use_vllm, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    mode: Literal["structured", "strided"] = Field(default="structured", description="structured: prompt + ground-truth completion, completions generated like GRPO (in-process or vLLM); strided: unstructured text, blocks generated in parallel at anchors every `stride` tokens.")
    feature_layers: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1, description="Depths (fractions in [0, 1]) whose hidden states are the features: layer int(f × num_hidden_layers) of the hidden states (0 = the embeddings), concatenated.")
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = Field(default="last_token", description="Pooling of the per-token features into one vector: the last token, the mean over the sequence, the mean over the completion only, or the tokens at 1/4, 1/2 and 3/4 of the sequence concatenated.")
    use_whitening: bool = Field(default=False, description="Whiten the features of each group (SVD of the generated features; singular values <= 1e-5 x the largest dropped) instead of L2-normalising them.")
    alignment_coef: float = Field(default=1.0, ge=0.0, description="Weight of the alignment reward 2·cos(g_j, gt).")
    diversity_coef: float = Field(default=1.0, ge=0.0, description="Weight of the diversity penalty 2/(n-1)·Σ_{j'≠j} g_j·g_j'.")
    ce_coef: float = Field(default=0.0, ge=0.0, description="Weight of the cross-entropy on the ground-truth tokens added to the loss (0: off).")
    rl_coef: float = Field(default=1.0, ge=0.0, description="Weight of the policy-gradient term (strided: REINFORCE; structured: GRPO's loss).")
    adaptive_max_tokens: bool = Field(default=True, description="Structured mode: cap the completion length of a rollout at max over its prompts of gt_length_multiplier × ground-truth tokens (at least 64, at most max_completion_length).")
    gt_length_multiplier: float = Field(default=1.5, gt=0.0, description="Structured mode: see adaptive_max_tokens.")
    stride: int = Field(default=8, ge=1, description="Strided mode: tokens between anchors.")
    context_length: int = Field(default=8, ge=1, description="Strided mode: the first anchor of a plain document (tokens of context before it).")
    generate_max_len: int = Field(default=8, ge=1, description="Strided mode: tokens generated per block (and of ground truth per anchor).")
    n_samples_per_prompt: int = Field(default=4, ge=2, description="Strided mode: blocks sampled per anchor (the group).")
    temperature: float = Field(default=0.6, gt=0.0, description="Strided mode: sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Strided mode: nucleus sampling threshold.")
    advantage_estimator: Literal["rloo", "group_norm", "grpo", "reinforce"] = Field(default="rloo", description="Strided mode: rloo (leave-one-out baseline), group_norm (grpo: mean and std of the group), reinforce (the raw reward).")
    min_completion_prefix: int = Field(default=0, ge=0, description="Strided mode, prompt/completion rows: completion tokens before the first anchor.")

    @field_validator("feature_layers")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(f"feature_layers are fractions of the depth in [0, 1]; got {bad}")
        return value
