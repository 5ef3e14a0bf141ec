"""The data that flows through online RL: sampling settings, a backend's completions, a scored rollout.

Order everywhere is prompt-major: completion i belongs to prompt group i // num_generations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings (TRL/vLLM names). `n` completions are drawn per prompt.

    top_k None or 0 and min_p None mean off; `extra` holds `trl.generation_kwargs`, passed to the backend as is
    (to `generate()` in-process, into the request body for a vLLM server).
    """

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completions:
    """What a generation backend (or a user's rollout function) returns for N = prompts × n completions.

    completion_ids: N token-id lists, each ending with EOS unless truncated.
    truncated: N flags, True when the completion hit the token limit without EOS.
    logprobs: N lists of the sampler's per-token log-probs of the sampled tokens (under the processed
        distribution: temperature, top-p, top-k applied), one per completion token; None when the backend
        gives none (then no importance-sampling correction is possible).
    prompt_ids: N prompt token-id lists when the producer of the completions chose them (TRL-form rollout
        functions, multi-turn environments); None: the rendered prompts, each repeated n times.
    loss_mask: N lists of 0/1 per completion token (0: a tool/environment token kept out of the loss);
        None: every token is in the loss.
    extra: per-completion columns (name → N values) handed to the reward functions as keyword arguments.
    metrics: the source's own numbers for this rollout (e.g. NeMo Gym's `nemo_gym/verify_errors`), logged with the
        rollout metrics.
    """

    completion_ids: list[list[int]]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None
    prompt_ids: list[list[int]] | None = None
    loss_mask: list[list[int]] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def check(self, n: int, source: str) -> "Completions":
        """Validate lengths against N = `n` completions. Raises ValueError naming `source` and the field."""
        if len(self.completion_ids) != n:
            raise ValueError(f"{source} returned {len(self.completion_ids)} completions; {n} expected "
                             f"(prompts × num_generations)")
        if len(self.truncated) != n:
            raise ValueError(f"{source}: truncated has {len(self.truncated)} entries for {n} completions")
        for name in ("logprobs", "loss_mask"):
            per_token = getattr(self, name)
            if per_token is None:
                continue
            for i, (values, ids) in enumerate(zip(per_token, self.completion_ids)):
                if len(values) != len(ids):
                    raise ValueError(f"{source}: {name}[{i}] has {len(values)} entries for {len(ids)} completion tokens")
        if self.prompt_ids is not None and len(self.prompt_ids) != n:
            raise ValueError(f"{source}: prompt_ids has {len(self.prompt_ids)} entries for {n} completions")
        for key, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"{source}: extra field {key!r} has {len(values)} values for {n} completions")
        return self


@dataclass
class Rollout:
    """One generated and scored rollout, before any cross-process step: N = P prompts × G completions.

    rows: the P dataset rows (prompt plus extra columns) it was made from.
    prompt_ids, completion_ids: N token-id lists (prompt rendered with the chat template, then completion).
    loss_mask: N lists of 0/1 per completion token (1: in the loss).
    sampler_logps: N lists of the sampler's per-token log-probs, or None when the backend gives none.
    truncated: N flags (no EOS within max_completion_length).
    texts: N decoded completions (special tokens skipped).
    rewards: [N, K] float32 rewards per function (NaN where a function returned None); reward_names: K names.
    policy_version: optimiser steps the sampling weights had taken (0: the initial weights).
    num_generations: G. timings: seconds per phase ("generation", "scoring").
    row_ids: the P dataset indices of `rows` (empty when unknown).
    versions: N policy versions, one per completion, when they differ (replayed groups); None: all
        `policy_version`.
    old_logps: N per-token old-policy log-probs saved with replayed groups (None entries: compute them), or None.
    metrics: the rollout source's own metrics (`Completions.metrics`).
    conversations: N whole generated conversations of rows with `remaining_turns` (EBFT multi-turn; see
        `RolloutProducer.continue_turns`): the prompt's messages, the completion as the first assistant turn, then
        each remaining user turn as given and each remaining assistant turn generated by the policy (None entries
        for rows without); None: no row has remaining turns. Only the feature network reads them: the loss trains
        the completion.
    """

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_mask: list[list[int]]
    sampler_logps: list[list[float]] | None
    truncated: list[bool]
    texts: list[str]
    rewards: torch.Tensor
    reward_names: list[str]
    policy_version: int
    num_generations: int
    timings: dict[str, float] = field(default_factory=dict)
    row_ids: list[int] = field(default_factory=list)
    versions: list[int] | None = None
    old_logps: list[list[float] | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    conversations: list[list[dict[str, Any]] | None] | None = None

    @property
    def size(self) -> int:
        """N completions."""
        return len(self.completion_ids)

    def completion_versions(self) -> list[int]:
        """The policy version of each of the N completions."""
        return list(self.versions) if self.versions is not None else [self.policy_version] * self.size

    def prompts(self) -> list[Any]:
        """The N prompts (each row's `prompt`, repeated G times)."""
        return [r["prompt"] for r in self.rows for _ in range(self.num_generations)]
