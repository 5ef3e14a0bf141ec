"""Rollouts for online RL: prompts → completions → rewards → advantages → a batch to optimise.

`RolloutMaker.make(rows)` renders and tokenises prompts, generates `num_generations` completions per
prompt (or calls the user's `rollout_func`), scores them with the reward functions, computes
group-relative (GRPO) or per-reward-normalised (GDPO) advantages, and runs the no-grad forwards the
loss needs (old policy log-probs when a rollout is reused, reference log-probs when beta > 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reinforge.algorithms.advantages import compute_advantages, reward_metrics
from reinforge.algorithms.logprobs import split_to_padded
from reinforge.data.collate import pad_sequences
from reinforge.generation.base import Rollout, SamplingParams
from reinforge.rewards import format_completions


@dataclass
class RolloutBatch:
    """N = prompts × num_generations completions, prompt-major, ready for the policy loss.

    batch: collate tensors (see reinforge.data.collate) of prompt+completion sequences.
    mask: [N, T] completion tokens in the loss (0 rows for masked truncated completions).
    advantages: [N]; old_logps / ref_logps: [N, T] or None.
    """

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.advantages.shape[0]

    def micro_batch(self, start: int, size: int) -> "RolloutBatch":
        """Completions [start, start+size) as a RolloutBatch of their own (rows re-padded)."""
        sl = slice(start, start + size)
        lengths = self.batch["n_tokens"][sl]
        keep = self.batch["attention_mask"][sl].sum(1).max()
        sub = {k: v[sl, :keep] for k, v in self.batch.items() if k != "n_tokens"}
        rows = torch.arange(sub["seq_index"].shape[0]).unsqueeze(1)
        sub["seq_index"] = torch.where(sub["seq_index"] >= 0, rows.expand_as(sub["seq_index"]), -1)
        sub["n_tokens"] = lengths
        T = max(int(lengths.max()), 1)
        cut = lambda t: None if t is None else t[sl, :T]  # noqa: E731
        return RolloutBatch(sub, self.mask[sl, :T], self.advantages[sl], cut(self.old_logps), cut(self.ref_logps), {})


def per_token(out: dict[str, torch.Tensor], n_tokens: torch.Tensor) -> torch.Tensor:
    """LogpsModel output → per-token log-probs [S, T] (right-padded with 0)."""
    return split_to_padded(out["token_logps"], n_tokens)[0]


class RolloutMaker:
    """Builds RolloutBatch objects; every dependency is passed in explicitly."""

    def __init__(self, tokenizer, generator, reward_funcs: list[Callable], reward_names: list[str],
                 reward_weights: list[float], params: SamplingParams, *, scale_rewards, aggregation: str,
                 score_fn: Callable, chat_kwargs: dict[str, Any] | None, max_prompt_length: int | None,
                 mask_truncated: bool, rollout_func: Callable | None = None):
        self.tokenizer, self.generator = tokenizer, generator
        self.reward_funcs, self.reward_names = reward_funcs, reward_names
        self.reward_weights = torch.tensor(reward_weights, dtype=torch.float32)
        self.params, self.scale_rewards, self.aggregation = params, scale_rewards, aggregation
        self.score_fn, self.chat_kwargs = score_fn, chat_kwargs or {}
        self.max_prompt_length, self.mask_truncated = max_prompt_length, mask_truncated
        self.rollout_func = rollout_func

    def prompt_ids(self, prompt: Any) -> list[int]:
        """Render (chat template with generation prompt) and tokenise a prompt; keep its end if too long."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **self.chat_kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_prompt_length and len(ids) > self.max_prompt_length:
            ids = ids[-self.max_prompt_length:]
        return ids

    def make(self, rows: list[dict[str, Any]], policy_logps: Callable | None, ref_logps: Callable | None) -> RolloutBatch:
        """Generate, score and prepare one rollout batch for `rows` (prompt records with extra columns).

        policy_logps / ref_logps: callables batch → LogpsModel output (no grad), or None when unused.
        """
        G = self.params.n
        prompts = [r["prompt"] for r in rows]
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        t0 = time.perf_counter()
        if self.rollout_func is not None:
            rollout = self.rollout_func(prompts=prompts, prompt_ids=prompt_ids, generator=self.generator,
                                        tokenizer=self.tokenizer, params=self.params)
            if not isinstance(rollout, Rollout) or len(rollout.completion_ids) != len(prompts) * G:
                raise ValueError(f"rollout_func must return a reinforge.generation.Rollout with {len(prompts) * G} completions")
        else:
            rollout = self.generator.generate(prompt_ids, self.params)
        t_gen = time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        completions = format_completions([p for p in prompts for _ in range(G)], texts)
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k not in ("prompt", "prompt_ids")}
        columns["completion_truncated"] = list(rollout.truncated)
        columns["max_completion_length"] = [self.params.max_new_tokens] * len(texts)
        t0 = time.perf_counter()
        rewards = self.score_fn(self.reward_funcs, [p for p in prompts for _ in range(G)], completions,
                                rollout.completion_ids, columns)
        t_score = time.perf_counter() - t0
        adv = compute_advantages(rewards, self.reward_weights, G, self.scale_rewards, self.aggregation)
        expanded_ids = [p for p in prompt_ids for _ in range(G)]
        batch = pad_sequences([(p + c, len(p)) for p, c in zip(expanded_ids, rollout.completion_ids)],
                              self.tokenizer.pad_token_id)
        _, mask = split_to_padded(torch.zeros(int(batch["n_tokens"].sum())), batch["n_tokens"])
        truncated = torch.tensor(rollout.truncated)
        if self.mask_truncated:
            mask = mask & ~truncated.unsqueeze(1)
        old = per_token(policy_logps(batch), batch["n_tokens"]).detach() if policy_logps else None
        ref = per_token(ref_logps(batch), batch["n_tokens"]).detach() if ref_logps else None
        lengths = batch["n_tokens"].float()
        term = lengths[~truncated] if (~truncated).any() else torch.zeros(1)
        metrics = {
            **reward_metrics(rewards, self.reward_weights, adv.std, self.reward_names),
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.float().mean().item(),
            "completions/mean_terminated_length": term.mean().item(),
            "time/generation": t_gen, "time/scoring": t_score,
        }
        table = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": t,
                  **{n: rewards[i, k].item() for k, n in enumerate(self.reward_names)}, "advantage": adv.advantages[i].item()}
                 for i, (p, t) in enumerate(zip((p for p in prompts for _ in range(G)), texts))]
        return RolloutBatch(batch, mask, adv.advantages, old, ref, metrics, table)
