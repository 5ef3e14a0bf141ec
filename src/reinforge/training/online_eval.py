"""Evaluation of an online run (GRPO/GDPO, structured EBFT) on its held-out prompts (`test_datasets` or
`val_set_size`), as TRL's GRPOTrainer evaluates: completions are generated for every eval prompt and scored, and
the rollout metrics are logged with an `eval_` prefix (`eval_reward`, `eval_rewards/<fn>/mean`,
`eval_completions/mean_length`, and for EBFT `eval_ebft/cfm_loss`, `eval_ebft/alignment` ...). No gradient, no
advantage is used.

Each chunk of eval prompts is sampled with the same seed at every evaluation, so two evaluations of a run differ
only by the weights (common random numbers): an `eval_ebft/cfm_loss` curve shows what training did, not which
prompts or draws a step happened to get.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from reinforge.algorithms.advantages import compute_advantages, reward_metrics
from reinforge.rollout.producer import RolloutProducer
from reinforge.rollout.stream import rollout_seed
from reinforge.training.metrics import MetricsAccumulator

EVAL_SEED_INDEX = -1  # rollout index of evaluation chunk i: EVAL_SEED_INDEX - i (training rollouts are >= 0)


def evaluate_online(rows: list[dict[str, Any]], producer: RolloutProducer, chunk: int, seed: int, version: int, *,
                    reward_weights: torch.Tensor, scale_rewards, aggregation: str,
                    scorer: Callable | None = None, rank: int = 0, world_size: int = 1,
                    accelerator=None) -> dict[str, float]:
    """Generate and score completions for this process's share of `rows`; the metric means, `eval_`-prefixed.

    Args:
        rows: the eval rows (prepared like training rows); process `rank` of `world_size` takes rows[rank::world_size].
        producer: the run's producer (same backend, sampling parameters and reward functions as training).
        chunk: prompts per `produce` call; seed: the run's seed (chunk i is sampled with
            `rollout_seed(seed, EVAL_SEED_INDEX - i, rank)`); version: the weights' step, recorded in the rollouts.
        reward_weights / scale_rewards / aggregation: as the preparer's (for `reward_std`, `frac_reward_zero_std`).
        scorer: EBFT's main-thread feature-matching scorer (sets the rewards, returns `ebft/*` metrics), or None.
        accelerator: reduces the means across processes (every process must call this); None: this process only.
    Returns: {"eval_<metric>": mean over completions (ebft metrics: over prompt chunks)}.
    Raises: what `producer.produce` raises (reward function errors, VLLMError).
    """
    acc = MetricsAccumulator()
    share = rows[rank::world_size]
    for i in range(0, len(share), chunk):
        part = share[i:i + chunk]
        rollout = producer.produce(part, rollout_seed(seed, EVAL_SEED_INDEX - i // chunk, rank), version)
        metrics = scorer(rollout) if scorer is not None else {}
        adv = compute_advantages(rollout.rewards, reward_weights, rollout.num_generations, scale_rewards, aggregation)
        lengths = torch.tensor([float(sum(m)) for m in rollout.loss_mask])
        metrics.update(reward_metrics(rollout.rewards, reward_weights, adv.std, rollout.reward_names))
        metrics.update({"completions/mean_length": lengths.mean().item(),
                        "completions/clipped_ratio": float(sum(rollout.truncated)) / len(rollout.truncated)})
        acc.add(metrics, weight=float(len(rollout.completion_ids)))
    return {f"eval_{k}": v for k, v in acc.means(accelerator).items()}
