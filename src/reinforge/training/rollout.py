"""Rollouts for online RL: prompts → completions → rewards → advantages → a batch to optimise.

`RolloutMaker.make(rows)` renders and tokenises prompts, generates `num_generations` completions per
prompt (or calls the user's `rollout_func`), scores them with the reward functions, computes
group-relative (GRPO) or per-reward-normalised (GDPO) advantages, and runs the no-grad forwards the
loss needs (old policy log-probs when a rollout is reused, reference log-probs when beta > 0).

With several processes each process holds whole prompt groups (all completions of a prompt are
generated, scored and normalised on one process); the rewards of all processes are gathered before the
advantages are computed, so "batch" scaling and GDPO's batch normalisation use the global batch, and
each process keeps its own slice (as TRL). Reward and length metrics are computed on the gathered values.

`RolloutStream` cuts micro-batches from successive rollouts and knows its position, so a checkpoint can
record it: rollout j reads prompt batch j of a `BatchPlan` and samples with a generator seeded from
(seed, j, process), so a resumed run regenerates the same completions; a rollout that was only partly
consumed when the checkpoint was written is saved with it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reinforge.training.distributed import BatchPlan, gather_rows, sum_across, world

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
    loss_tokens: loss tokens (mask entries) of the rollout per process, averaged over processes: the
        `num_items_in_batch` basis of the "dapo" aggregation.
    """

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)
    loss_tokens: float = 0.0

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
        return RolloutBatch(sub, self.mask[sl, :T], self.advantages[sl], cut(self.old_logps), cut(self.ref_logps), {},
                            loss_tokens=self.loss_tokens)


def per_token(out: dict[str, torch.Tensor], n_tokens: torch.Tensor, key: str = "token_logps") -> torch.Tensor:
    """LogpsModel output → per-token values [S, T] (right-padded with 0): log-probs, or another [N] output
    such as `token_entropy`."""
    return split_to_padded(out[key], n_tokens)[0]


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

    def _generate(self, prompts: list[Any], prompt_ids: list[list[int]], seed: int | None) -> Rollout:
        """Completions for the prompts; with `seed`, sampled under torch RNG state seeded with it (the global
        RNG state is left as it was)."""
        G = self.params.n
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if self.rollout_func is None:
                return self.generator.generate(prompt_ids, self.params)
            rollout = self.rollout_func(prompts=prompts, prompt_ids=prompt_ids, generator=self.generator,
                                        tokenizer=self.tokenizer, params=self.params)
        if not isinstance(rollout, Rollout) or len(rollout.completion_ids) != len(prompts) * G:
            raise ValueError(f"rollout_func must return a reinforge.generation.Rollout with {len(prompts) * G} completions")
        return rollout

    def make(self, rows: list[dict[str, Any]], policy_logps: Callable | None, ref_logps: Callable | None,
             seed: int | None = None) -> RolloutBatch:
        """Generate, score and prepare one rollout batch for `rows` (this process's prompt records, with extra
        columns). Every process must call this together (rewards are gathered across processes).

        policy_logps / ref_logps: callables batch → LogpsModel output (no grad), or None when unused.
        seed: seeds the sampling of this rollout (None: the current global RNG state).
        """
        G = self.params.n
        prompts = [r["prompt"] for r in rows]
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        t0 = time.perf_counter()
        rollout = self._generate(prompts, prompt_ids, seed)
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
        rank, _ = world()
        n = rewards.shape[0]
        all_rewards = gather_rows(rewards)  # [N × processes, K]: whole groups, process-major
        adv_all = compute_advantages(all_rewards, self.reward_weights, G, self.scale_rewards, self.aggregation)
        advantages = adv_all.advantages[rank * n:(rank + 1) * n]
        expanded_ids = [p for p in prompt_ids for _ in range(G)]
        batch = pad_sequences([(p + c, len(p)) for p, c in zip(expanded_ids, rollout.completion_ids)],
                              self.tokenizer.pad_token_id)
        _, mask = split_to_padded(torch.zeros(int(batch["n_tokens"].sum())), batch["n_tokens"])
        truncated = torch.tensor(rollout.truncated)
        if self.mask_truncated:
            mask = mask & ~truncated.unsqueeze(1)
        old = per_token(policy_logps(batch), batch["n_tokens"]).detach() if policy_logps else None
        ref = per_token(ref_logps(batch), batch["n_tokens"]).detach() if ref_logps else None
        lengths = gather_rows(batch["n_tokens"].float())
        truncated_all = gather_rows(truncated.float()) > 0.5
        term = lengths[~truncated_all] if (~truncated_all).any() else torch.zeros(1)
        world_size = world()[1]
        metrics = {
            **reward_metrics(all_rewards, self.reward_weights, adv_all.std, self.reward_names),
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated_all.float().mean().item(),
            "completions/mean_terminated_length": term.mean().item(),
            "time/generation": t_gen, "time/scoring": t_score,
        }
        table = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": t,
                  **{n: rewards[i, k].item() for k, n in enumerate(self.reward_names)}, "advantage": advantages[i].item()}
                 for i, (p, t) in enumerate(zip((p for p in prompts for _ in range(G)), texts))]
        loss_tokens = float(sum_across(mask.sum().double())) / world_size
        return RolloutBatch(batch, mask, advantages, old, ref, metrics, table, loss_tokens=loss_tokens)


def rollout_seed(seed: int, index: int, rank: int) -> int:
    """The sampling seed of rollout `index` on process `rank` of a run seeded with `seed` (63-bit)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{rank}".encode()).digest()[:8], "big") >> 1


class RolloutStream:
    """Endless (rollout, micro-batch) pairs; each rollout is optimised `num_iterations` times.

    Rollout j uses this process's prompts of global prompt batch j of `plan` (`plan.rows(j)`) and the
    sampling seed `rollout_seed(seed, j, rank)`. `position` = {"rollouts": made so far, "offset":
    micro-batches of the latest rollout consumed}; `state()` is the in-flight rollout when partly consumed.

    Args:
        plan: prompt batches (per process: prompts of one rollout; drop_last).
        prompts: the prompt rows; maker: a RolloutMaker; micro_batch_size: completions per micro-batch.
        policy_fn / ref_fn: no-grad forwards for old / reference log-probs (None when unused).
        on_rollout: called with each new rollout (metrics, completion logs).
        position, state: from a checkpoint, to continue exactly.
    """

    def __init__(self, plan: BatchPlan, prompts: list[dict[str, Any]], maker: RolloutMaker, micro_batch_size: int,
                 num_iterations: int, seed: int, policy_fn: Callable | None, ref_fn: Callable | None,
                 on_rollout: Callable[[RolloutBatch], None], position: dict[str, int] | None = None,
                 state: RolloutBatch | None = None):
        self.plan, self.prompts, self.maker, self.seed = plan, prompts, maker, seed
        self.micro_batch_size, self.num_iterations = micro_batch_size, num_iterations
        self.policy_fn, self.ref_fn, self.on_rollout = policy_fn, ref_fn, on_rollout
        self.per_rollout = plan.per_process * maker.params.n // micro_batch_size
        self.rollouts = (position or {}).get("rollouts", 0)
        self.offset = (position or {}).get("offset", 0)
        self.current = state
        if self.current is None and 0 < self.offset < self.per_rollout * num_iterations:
            raise ValueError("a partly consumed rollout needs its saved state to continue")

    @property
    def position(self) -> dict[str, int]:
        return {"rollouts": self.rollouts, "offset": self.offset}

    @property
    def consumed(self) -> int:
        """Rollouts whose micro-batches have all been consumed."""
        return self.rollouts - (1 if self.state() is not None else 0)

    def state(self) -> RolloutBatch | None:
        """The current rollout when some of its micro-batches are still to come, else None."""
        return self.current if 0 < self.offset < self.per_rollout * self.num_iterations else None

    def current_rows(self) -> list[int]:
        """Prompt-row indices (all processes) of the current rollout."""
        return self.plan.global_rows(max(self.rollouts - 1, 0))

    def __iter__(self) -> "RolloutStream":
        return self

    def __next__(self) -> tuple[RolloutBatch, RolloutBatch]:
        if self.current is None or self.offset >= self.per_rollout * self.num_iterations:
            rows = [self.prompts[i] for i in self.plan.rows(self.rollouts)]
            self.current = self.maker.make(rows, self.policy_fn, self.ref_fn,
                                           seed=rollout_seed(self.seed, self.rollouts, self.plan.rank))
            self.rollouts += 1
            self.offset = 0
            self.on_rollout(self.current)
        start = (self.offset % self.per_rollout) * self.micro_batch_size
        self.offset += 1
        return self.current, self.current.micro_batch(start, self.micro_batch_size)
