"""DPO loss family (Rafailov et al. 2023, arXiv 2305.18290) as pure functions of log-prob tensors.

Inputs are per-pair summed log-probabilities of the completion tokens, shape [B]:
`policy_chosen`, `policy_rejected`, `ref_chosen`, `ref_rejected` (natural log, summed over the
completion's scored tokens). Length-normalised losses also take `chosen_lengths`/`rejected_lengths`
[B] (scored tokens per completion). Each loss returns per-pair losses [B]; the caller averages.
Implicit rewards are β·(policy − reference) log-prob of each completion.

`preference_loss` combines several loss types with weights (TRL's `loss_type` list / `loss_weights`,
Axolotl's `dpo_loss_type` / `dpo_loss_weights`): Σ_k w_k · mean_B(loss_k), which is how TRL 1.16's
DPOTrainer sums them. The names and the conventions (which tensors are length-normalised, which
average over the batch) follow TRL 1.16 so that the same inputs give the same loss; deviations are
listed on each function.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Loss types of TRL 1.16's DPOTrainer, in its order.
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# Older TRL/Axolotl spelling → current name. `aot_pair` was the sorted-per-completion variant that
# TRL 1.16 calls `aot_unpaired`.
LOSS_ALIASES: dict[str, str] = {"aot_pair": "aot_unpaired"}
# Loss types that read `label_smoothing` (ε); every other type ignores it.
USES_LABEL_SMOOTHING: frozenset[str] = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})


def canonical_loss_type(name: str) -> str:
    """The TRL 1.16 name of a DPO loss type (resolving aliases such as `aot_pair`).

    Raises:
        ValueError: unknown name, listing the valid ones.
    """
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSS_TYPES:
        valid = ", ".join(LOSS_TYPES + tuple(LOSS_ALIASES))
        raise ValueError(f"unknown DPO loss type {name!r}; valid: {valid}")
    return name


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log πc − log π_ref,c) − (log πr − log π_ref,r), shape [B] (the DPO log-ratio margin)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO sigmoid loss, arXiv 2305.18290 eq. 7; with label_smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).

    Deviation from TRL 1.16: its `sigmoid` ignores `label_smoothing` (it reads ε only in robust, exo_pair
    and aot*); here ε > 0 gives cDPO, as in TRL < 1.0 and Axolotl's `dpo_label_smoothing` docs.

    Args: [B] summed log-probs each; beta > 0; 0 <= label_smoothing < 0.5.
    Returns: [B] per-pair losses.
    """
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge loss on the DPO margin (SLiC-HF, arXiv 2305.10425, its calibration loss with margin δ = 1/β): max(0, 1 − β·h).

    Args: [B] summed log-probs each; beta > 0. Returns: [B].
    """
    return torch.relu(1 - beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al., arXiv 2310.12036 eq. 17): (h̄ − 1/(2τ))² with τ = beta.

    h̄ uses per-token log-ratios: (log πc − log π_ref,c)/|yc| − (log πr − log π_ref,r)/|yr| (lengths
    clamped to >= 1). The paper writes sequence log-ratios; the per-token normalisation is TRL's
    (confirmed with the IPO authors, per TRL) and is kept for parity.

    Args: [B] summed log-probs each; [B] completion lengths (tokens); beta = τ > 0. Returns: [B].
    """
    c = (policy_chosen - ref_chosen) / chosen_lengths.clamp(min=1)
    r = (policy_rejected - ref_rejected) / rejected_lengths.clamp(min=1)
    return (c - r - 1 / (2 * beta)) ** 2


def exo_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                  beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref (Ji et al., arXiv 2402.00856 eq. 16, K = 2): KL(p_θ ‖ p_ε) where
    p_θ = (σ(β·h), σ(−β·h)) and the target p_ε = (1 − ε, ε):
    σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε).

    Args: [B] summed log-probs each; beta > 0; 0 < label_smoothing < 1 (the paper suggests 1e-3).
    Returns: [B].
    Raises: ValueError when label_smoothing is not in (0, 1) (log ε would be undefined).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (e.g. 1e-3), got {label_smoothing}")
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def nca_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA for pairs (Chen et al., arXiv 2402.05369, the NCA loss with K = 2 responses) with rewards r = β·log-ratio:
    −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r).

    Args: [B] summed log-probs each; beta > 0. Returns: [B].
    """
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def robust_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., arXiv 2403.00409, the rDPO loss), ε = probability a label is flipped:
    [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε).

    Args: [B] summed log-probs each; beta > 0; 0 <= label_smoothing < 0.5. Returns: [B].
    Raises: ValueError when label_smoothing is outside [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def bco_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                  beta: float, delta: float = 0.0) -> torch.Tensor:
    """Binary-classifier optimisation on pairs (Jung et al., arXiv 2404.04656, the BCO loss applied to both completions of a pair):
    −log σ(r_c − δ) − log σ(−(r_r − δ)), rewards r = β·log-ratio, δ the reward shift.

    The paper sets δ to a running mean of past rewards (the caller keeps that state and passes it as
    a float). TRL 1.16 uses δ = 0; TRL < 1.0 used the running mean.

    Args: [B] summed log-probs each; beta > 0; delta: reward shift (float). Returns: [B].
    """
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))


def sppo_hard_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                   ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al., arXiv 2405.00675 eq. 4.7 with P = 1 for the chosen,
    0 for the rejected; η = β⁻¹ scale as in TRL): (log-ratio_c − 1/(2β))² + (log-ratio_r + 1/(2β))².

    Args: [B] summed log-probs each; beta > 0. Returns: [B].
    """
    return ((policy_chosen - ref_chosen) - 0.5 / beta) ** 2 + ((policy_rejected - ref_rejected) + 0.5 / beta) ** 2


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def aot_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Alignment via Optimal Transport, paired (Melnyk et al., arXiv 2406.05882, paired AOT): the batch's
    policy margins (log πc − log πr) and reference margins are each sorted, then the smoothed sigmoid
    loss is taken on sorted_policy − sorted_reference. The loss couples the whole batch (it is not a
    per-pair function); element i of the result belongs to the i-th order statistic, not to pair i.

    Args: [B] summed log-probs each; beta > 0; 0 <= label_smoothing < 0.5. Returns: [B].
    """
    pol = torch.sort(policy_chosen - policy_rejected, dim=0).values
    ref = torch.sort(ref_chosen - ref_rejected, dim=0).values
    return _smoothed_sigmoid(beta * (pol - ref), label_smoothing)


def aot_unpaired_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                      beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (arXiv 2406.05882, unpaired AOT; `aot_pair` in TRL < 1.0): chosen log-ratios and rejected
    log-ratios are sorted separately, then the smoothed sigmoid loss is taken on their difference.
    Couples the batch like `aot_loss`.

    Args: [B] summed log-probs each; beta > 0; 0 <= label_smoothing < 0.5. Returns: [B].
    """
    c = torch.sort(policy_chosen - ref_chosen, dim=0).values
    r = torch.sort(policy_rejected - ref_rejected, dim=0).values
    return _smoothed_sigmoid(beta * (c - r), label_smoothing)


def apo_zero_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Anchored preference optimisation, APO-zero (D'Oosterlinck et al., arXiv 2408.06266 eq. 7):
    (1 − σ(r_c)) + σ(r_r) with r = β·log-ratio — raises the chosen, lowers the rejected likelihood.

    Args: [B] summed log-probs each; beta > 0. Returns: [B].
    """
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return (1 - torch.sigmoid(rc)) + torch.sigmoid(rr)


def apo_down_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266 eq. 8): σ(r_c) + (1 − σ(r_c − r_r)) — lowers both likelihoods, the
    rejected more (for chosen outputs worse than the model's own).

    Args: [B] summed log-probs each; beta > 0. Returns: [B].
    """
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return torch.sigmoid(rc) + (1 - torch.sigmoid(rc - rr))


def discopop_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP, log-ratio modulated loss (Chan et al., arXiv 2406.08414 eq. 5), z = β·h:
    (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·exp(−z).

    Args: [B] summed log-probs each; beta > 0; tau > 0 (paper: 0.05). Returns: [B].
    """
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    m = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sigmoid_norm_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                      chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """Length-normalised DPO (the length-normalised DPO of Tülu 3, arXiv 2411.15124; TRL `sigmoid_norm`):
    −log σ(β·(ratio_c/|yc| − ratio_r/|yr|)), lengths clamped to >= 1.

    Args: [B] summed log-probs each; [B] completion lengths; beta > 0. Returns: [B].
    """
    c = (policy_chosen - ref_chosen) / chosen_lengths.clamp(min=1)
    r = (policy_rejected - ref_rejected) / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * (c - r))


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token over the whole batch: −Σ_i log πc_i / Σ_i |yc_i|.

    This is the SFT term of TRL's `sft` loss type, of RPO (Pang et al., arXiv 2404.19733, as TRL
    < 1.0 implemented `rpo_alpha`: token-weighted mean over the batch) and of CPO's NLL term (arXiv
    2401.08417). Tokens, not sequences, are averaged: long completions weigh more.

    Args: policy_chosen [B] summed log-probs; chosen_lengths [B] scored tokens (total must be > 0).
    Returns: scalar.
    """
    return -policy_chosen.sum() / chosen_lengths.sum().clamp(min=1)


def sequence_positions(token_seq: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """1-based position of each scored token within its sequence.

    Args: token_seq [N] sequence id of each scored token, tokens of a sequence in order (row-major).
    Returns: [N] long.
    """
    order = torch.sort(token_seq, stable=True).indices
    counts = torch.bincount(token_seq, minlength=n_seqs)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(token_seq.numel(), device=token_seq.device) - starts[token_seq[order]]
    pos = torch.empty_like(ranks)
    pos[order] = ranks + 1
    return pos


def ld_logps(token_logps: torch.Tensor, token_seq: torch.Tensor, n_tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO log-probs (Liu et al., arXiv 2409.06411, the length-desensitised log-likelihood): per sequence, the sum over the first ℓ
    completion tokens plus α × the sum over the rest, where ℓ = min(|yc|, |yr|) of its pair.

    Args:
        token_logps [N]: per-token log-probs in sequence order; token_seq [N]: sequence of each token.
        n_tokens [2B]: scored tokens per sequence, ordered [chosen_0..B-1, rejected_0..B-1].
        alpha: weight of the tokens beyond the shared length, in [0, 1] (1 = plain sums).
    Returns: [2B] weighted sums.
    """
    S = n_tokens.shape[0]
    B = S // 2
    shared = torch.minimum(n_tokens[:B], n_tokens[B:]).repeat(2)
    pos = sequence_positions(token_seq, S)
    w = torch.where(pos <= shared[token_seq], 1.0, alpha).to(token_logps.dtype)
    return token_logps.new_zeros(S).index_add(0, token_seq, token_logps * w)


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, token_seq: torch.Tensor,
                n_tokens: torch.Tensor) -> torch.Tensor:
    """WPO sequence weights (Zhou et al., arXiv 2406.11827 eq. 2, with TRL's aligned normalisation):
    w = exp( mean_t [ log p(y_t) − log Σ_v p(v)² ] ) per sequence, detached.

    Args:
        token_logps [N]: per-token log-probs; token_log_sum_sq_probs [N]: log Σ_v p_v² of each token's
        next-token distribution; token_seq [N]; n_tokens [S] (lengths, clamped to >= 1).
    Returns: [S] weights (no gradient). A pair's weight is w_chosen · w_rejected.
    """
    with torch.no_grad():
        aligned = (token_logps - token_log_sum_sq_probs).to(token_logps.dtype)
        sums = token_logps.new_zeros(n_tokens.shape[0]).index_add(0, token_seq, aligned)
        return torch.exp(sums / n_tokens.clamp(min=1).to(sums.dtype))


def preference_loss(loss_types: Sequence[str], loss_weights: Sequence[float],
                    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, discopop_tau: float = 0.05, bco_delta: float = 0.0,
                    pair_weights: torch.Tensor | None = None,
                    sft_chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k · mean_B(loss_k · pair_weights) over the DPO loss types (TRL 1.16 `loss_type` list).

    MPO (Wang et al., arXiv 2411.10442: preference + quality + generation loss) is `loss_types=[sigmoid, bco_pair, sft]`,
    `loss_weights=[0.8, 0.2, 1.0]`. `sft` is the batch's chosen NLL per token (`chosen_nll`),
    the same for every pair.

    Args:
        loss_types: names (aliases allowed); loss_weights: one float per type.
        policy_/ref_ chosen/rejected [B]: summed log-probs (LD-DPO-weighted ones when ld_alpha is used).
        chosen_lengths, rejected_lengths [B]: completion lengths (tokens) for ipo/sigmoid_norm/sft.
        beta, label_smoothing, discopop_tau, bco_delta: floats (see each loss).
        pair_weights [B] or None: WPO weights w_c·w_r multiplying every per-pair loss.
        sft_chosen [B] or None: chosen log-prob sums for the `sft` term (default `policy_chosen`; TRL
            uses the un-weighted sums there when LD-DPO weights the others).
    Returns: (scalar loss, {loss type: its unweighted batch mean, detached}).
    Raises: ValueError for unknown types or mismatched lengths.
    """
    if len(loss_types) != len(loss_weights):
        raise ValueError(f"{len(loss_types)} loss types but {len(loss_weights)} weights")
    args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    lengths = (chosen_lengths, rejected_lengths)
    total = policy_chosen.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for name, weight in zip(loss_types, loss_weights):
        name = canonical_loss_type(name)
        if name == "sigmoid":
            losses = sigmoid_loss(*args, beta, label_smoothing)
        elif name == "hinge":
            losses = hinge_loss(*args, beta)
        elif name == "ipo":
            losses = ipo_loss(*args, *lengths, beta)
        elif name == "exo_pair":
            losses = exo_pair_loss(*args, beta, label_smoothing)
        elif name == "nca_pair":
            losses = nca_pair_loss(*args, beta)
        elif name == "robust":
            losses = robust_loss(*args, beta, label_smoothing)
        elif name == "bco_pair":
            losses = bco_pair_loss(*args, beta, bco_delta)
        elif name == "sppo_hard":
            losses = sppo_hard_loss(*args, beta)
        elif name == "aot":
            losses = aot_loss(*args, beta, label_smoothing)
        elif name == "aot_unpaired":
            losses = aot_unpaired_loss(*args, beta, label_smoothing)
        elif name == "apo_zero":
            losses = apo_zero_loss(*args, beta)
        elif name == "apo_down":
            losses = apo_down_loss(*args, beta)
        elif name == "discopop":
            losses = discopop_loss(*args, beta, discopop_tau)
        elif name == "sigmoid_norm":
            losses = sigmoid_norm_loss(*args, *lengths, beta)
        else:  # sft
            chosen = policy_chosen if sft_chosen is None else sft_chosen
            losses = chosen_nll(chosen, chosen_lengths).expand(policy_chosen.shape[0])
        if pair_weights is not None:
            losses = losses * pair_weights
        mean = losses.mean()
        parts[name] = mean.detach()
        total = total + mean * weight
    return total, parts


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward β·(log π − log π_ref), shape as inputs. Detached (a metric, not a loss)."""
    return (beta * (policy_logps - ref_logps)).detach()
