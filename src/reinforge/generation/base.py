"""The generator interface: prompts (token ids), n, sampling parameters → completions.

A backend implements `generate` and `update_weights`; the online loop never knows which backend it
talks to (in-process `generate` on the policy, or a vLLM server with LoRA hot-swap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings (TRL/vLLM names). `n` completions are drawn per prompt."""

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """Completions in prompt-major order: completion i belongs to prompt i // n.

    completion_ids: token ids of each completion, ending with EOS unless truncated.
    truncated: True when the completion hit max_new_tokens without EOS.
    logprobs: per-token sampling log-probs (under the sampling distribution) when the backend gives them.
    """

    completion_ids: list[list[int]]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None


class Generator(Protocol):
    """A generation backend."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Sample `params.n` completions for each prompt (token ids, no padding)."""
        ...

    def update_weights(self, model: Any) -> None:
        """Make the backend sample from the current policy weights (no-op when it shares them)."""
        ...
