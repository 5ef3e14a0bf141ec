"""Group-relative advantages for GRPO and GDPO, as pure functions of reward tensors.

Layout: the N = P·G completions of a rollout batch are ordered prompt by prompt, each prompt's G
completions (`num_generations`) contiguous, so `x.view(P, G)` groups them. Rewards are
`rewards_per_func` [N, K], one column per reward function; NaN means "this reward function does not
apply to this completion" (it returned None). NaN handling follows TRL 1.16 `GRPOTrainer`:
weighted sums use nansum, means and standard deviations ignore NaN, a completion for which every
reward function returned NaN is *unscorable*: it is left out of its group's statistics and its
advantage is 0.

Standard deviations are Bessel-corrected (divide by n − 1) and are NaN when fewer than two values
are present, as `torch.std` / TRL's `nanstd`; advantages are divided by `std + eps` with
eps = 1e-4 (TRL's constant).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]

ADVANTAGE_EPS = 1e-4


def normalize_scale_rewards(scale_rewards: str | bool) -> ScaleRewards:
    """Map the config value of `scale_rewards` to one of "group", "batch", "none".

    True → "group", False → "none" (TRL's aliases). Raises ValueError for anything else.
    """
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards in ("group", "batch", "none"):
        return scale_rewards  # type: ignore[return-value]
    raise ValueError(f"scale_rewards must be 'group', 'batch', 'none', True or False; got {scale_rewards!r}")


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaN entries.

    Args:
        x: any shape, floating point.
        dim: dimension to reduce (None: all elements).
        keepdim: keep the reduced dimension (size 1).
    Returns:
        The standard deviation over the non-NaN entries; NaN where fewer than 2 entries are non-NaN.
        Shape: as `torch.std` with the same `dim`/`keepdim`.
    """
    if dim is None:
        flat = x.reshape(-1)
        out = nanstd(flat, dim=0, keepdim=False)
        return out.reshape([1] * x.dim()) if keepdim else out
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    var = sq / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim)


def weighted_reward_sum(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · r_k per completion, skipping NaN rewards; NaN where all K rewards are NaN.

    Args:
        rewards_per_func: [N, K] rewards (NaN = not applicable).
        reward_weights: [K] weights.
    Returns:
        [N] weighted sums (the scalar reward of GRPO's "sum_then_normalize").
    """
    _check_rewards(rewards_per_func, reward_weights)
    total = (rewards_per_func * reward_weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return total.masked_fill(unscorable, float("nan"))


class AdvantageResult(NamedTuple):
    """Output of the advantage estimators.

    advantages: [N] per-completion advantages (0 for unscorable completions); no gradient.
    std: [N] the standard deviation each advantage was compared against: the group's (scale "group"
        or "none") or the batch's (scale "batch", and always for GDPO's final step). It is the
        quantity behind TRL's `frac_reward_zero_std` metric.
    """

    advantages: torch.Tensor
    std: torch.Tensor


def group_relative_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group",
                              eps: float = ADVANTAGE_EPS) -> AdvantageResult:
    """GRPO advantages from one scalar reward per completion (arXiv 2402.03300, §4.1.2, "outcome
    supervision": Â_i = (r_i − mean(r)) / std(r) over the G completions of one prompt).

    Args:
        rewards: [N] scalar rewards, N divisible by `num_generations`; NaN = unscorable.
        num_generations: G, completions per prompt (contiguous in `rewards`).
        scale_rewards: "group" (divide by the group's std, the paper), "batch" (divide by the std of
            all N rewards; PPO-Lite, arXiv 2508.08221), "none" (no division; Dr. GRPO, arXiv
            2503.20783); True/False are aliases of "group"/"none".
        eps: added to the std before dividing.
    Returns:
        AdvantageResult(advantages [N], std [N]). The baseline is always the group mean.
    Raises:
        ValueError: N not divisible by G, or an invalid `scale_rewards`.

    Deviations from the paper: eps = 1e-4 in the denominator and Bessel-corrected std (as TRL 1.16);
    with G = 1 the std is taken as 0 (TRL's eval behaviour).
    """
    scale = normalize_scale_rewards(scale_rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if num_generations < 1 or n % num_generations != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of num_generations={num_generations}")
    grouped = rewards.reshape(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if n > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + eps)
    return AdvantageResult(torch.nan_to_num(advantages, nan=0.0), std)


def gdpo_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                    eps: float = ADVANTAGE_EPS) -> AdvantageResult:
    """GDPO advantages: group-normalise each reward separately, take the weighted sum, then
    normalise over the batch (arXiv 2601.05242, "GDPO: Group reward-Decoupled Normalization Policy
    Optimization", eqs. for A_k = (r_k − mean_group r_k)/std_group r_k, A = Σ_k w_k A_k, then
    Â = (A − mean_batch A)/(std_batch A + ε)).

    This is TRL 1.16's `multi_objective_aggregation="normalize_then_sum"`; `scale_rewards` does not
    apply to it (the final scaling is always over the batch).

    Args:
        rewards_per_func: [N, K] rewards, NaN = not applicable.
        reward_weights: [K] weights w_k.
        num_generations: G, completions per prompt (contiguous).
        eps: added to each std before dividing.
    Returns:
        AdvantageResult(advantages [N], std [N] = the batch std of the weighted sum, expanded).
    Raises:
        ValueError: bad shapes or N not divisible by G.

    NaN handling: a reward that is NaN, or whose group has fewer than two non-NaN values (std NaN),
    contributes nothing to the sum (nansum); a completion with every reward NaN gets advantage 0 and
    is left out of the batch statistics.
    """
    _check_rewards(rewards_per_func, reward_weights)
    n, k = rewards_per_func.shape
    if num_generations < 1 or n % num_generations != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of num_generations={num_generations}")
    grouped = rewards_per_func.reshape(-1, num_generations, k)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    normalized = ((grouped - mean_k) / (std_k + eps)).reshape(n, k)
    combined = (normalized * reward_weights.to(normalized).unsqueeze(0)).nansum(dim=1)
    combined = combined.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
    std = nanstd(combined).expand_as(combined) if n > 1 else torch.zeros_like(combined)
    advantages = (combined - torch.nanmean(combined)) / (std + eps)
    return AdvantageResult(torch.nan_to_num(advantages, nan=0.0), std)


def compute_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                       scale_rewards: str | bool = "group", multi_objective_aggregation: str = "sum_then_normalize",
                       eps: float = ADVANTAGE_EPS) -> AdvantageResult:
    """Advantages of a rollout batch from its per-function rewards (GRPO or GDPO).

    Args:
        rewards_per_func: [N, K] rewards of all completions of the batch (all processes), NaN = not
            applicable; N = prompts × num_generations, each prompt's completions contiguous.
        reward_weights: [K] weights (the config's `reward_weights`, default all 1).
        num_generations: G.
        scale_rewards: "group" | "batch" | "none" (or True/False); used by "sum_then_normalize" only.
        multi_objective_aggregation: "sum_then_normalize" (GRPO: weighted nansum, then
            `group_relative_advantages`) or "normalize_then_sum" (GDPO: `gdpo_advantages`).
        eps: std offset.
    Returns:
        AdvantageResult(advantages [N], std [N]). Unscorable completions (all rewards NaN) get 0.
    Raises:
        ValueError: unknown aggregation or scale, bad shapes.
    """
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = weighted_reward_sum(rewards_per_func, reward_weights)
        return group_relative_advantages(rewards, num_generations, scale_rewards, eps)
    if multi_objective_aggregation == "normalize_then_sum":
        normalize_scale_rewards(scale_rewards)  # still reject invalid values
        return gdpo_advantages(rewards_per_func, reward_weights, num_generations, eps)
    raise ValueError(
        f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; got {multi_objective_aggregation!r}"
    )


def reward_metrics(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, std: torch.Tensor,
                   reward_names: list[str]) -> dict[str, float]:
    """Reward statistics under TRL's metric names, for logging one rollout batch.

    Args:
        rewards_per_func: [N, K] rewards (NaN = not applicable).
        reward_weights: [K].
        std: [N] the `std` field of an `AdvantageResult` for the same batch.
        reward_names: K names (the functions' `__name__`, as TRL).
    Returns:
        {"rewards/{name}/mean", "rewards/{name}/std"} per function (over non-NaN values),
        "reward" and "reward_std" (of the weighted nansum, unscorable rows excluded) and
        "frac_reward_zero_std" (fraction of completions whose std is 0, i.e. whose group — or batch —
        carried no learning signal).
    """
    if len(reward_names) != rewards_per_func.shape[1]:
        raise ValueError(f"{len(reward_names)} reward names for {rewards_per_func.shape[1]} reward columns")
    out: dict[str, float] = {}
    for i, name in enumerate(reward_names):
        col = rewards_per_func[:, i]
        out[f"rewards/{name}/mean"] = torch.nanmean(col).item()
        out[f"rewards/{name}/std"] = nanstd(col).item()
    total = weighted_reward_sum(rewards_per_func, reward_weights)
    out["reward"] = torch.nanmean(total).item()
    out["reward_std"] = nanstd(total).item()
    out["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return out


def _check_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> None:
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be 2-D [N, K]; got shape {tuple(rewards_per_func.shape)}")
    if reward_weights.dim() != 1 or reward_weights.shape[0] != rewards_per_func.shape[1]:
        raise ValueError(
            f"reward_weights must have shape [{rewards_per_func.shape[1]}] (one per reward function); "
            f"got {tuple(reward_weights.shape)}"
        )
