"""Per-token and per-sequence log-probabilities, without materialising full-vocabulary logits.

A preference step needs log p(token) only at completion positions. Computing the LM head over all
positions and keeping [rows, length, vocab] float32 logits is the largest activation of a small
model; `chunked_token_logps` applies the LM head to chunks of the selected positions only and
recomputes each chunk in backward (activation checkpointing), so peak memory is
O(chunk_size × vocab) instead of O(tokens × vocab), with identical values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def selective_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without the [N, V] log-softmax tensor.

    Args:
        logits: [N, V] float.
        targets: [N] long, valid vocabulary ids.
    Returns:
        [N] float32 (or float64 when logits are float64) log-probabilities.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last dimension, in row chunks.

    Args:
        logits: [..., V]; computed in float32 when half precision (float64 stays float64).
        chunk_size: rows of the flattened [N, V] logits per chunk (peak extra memory ≈ chunk × V).
    Returns:
        [...] entropies, no gradient (a metric; TRL logs its masked mean as `entropy`).
    """
    shape = logits.shape[:-1]
    flat = logits.detach().reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    if not out:
        return flat.new_zeros(shape)
    return torch.cat(out).reshape(shape)


TOKEN_STATS = ("entropy", "mean_logits", "is_top1")


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor, stats: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-position statistics of logits, for metrics (no gradient).

    Args:
        logits: [N, V]; targets: [N] long; stats: names from TOKEN_STATS.
    Returns:
        {name: [N]}: "entropy" (nats, `entropy_from_logits`), "mean_logits" (mean over the vocabulary:
        TRL's `logits/chosen|rejected` average it over completion tokens), "is_top1" (float 1.0 when the
        target is the arg-max: TRL's `mean_token_accuracy`).
    Raises:
        ValueError: an unknown name.
    """
    unknown = set(stats) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"unknown token statistics {sorted(unknown)}; known: {', '.join(TOKEN_STATS)}")
    out = {}
    if "entropy" in stats:
        out["entropy"] = entropy_from_logits(logits)
    if "mean_logits" in stats:
        out["mean_logits"] = logits.detach().float().mean(-1).to(logits.dtype)
    if "is_top1" in stats:
        out["is_top1"] = (logits.detach().argmax(-1) == targets).to(logits.dtype)
    return out


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, temperature: float, stats: tuple[str, ...] = ()):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_logps(logits, targets)
    return (logps, token_stats(logits, targets, stats)) if stats else logps


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0,
                        stats: tuple[str, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of `targets` under an LM head applied to `hidden`, chunk by chunk.

    Args:
        hidden: [N, H] final hidden states at the selected positions.
        weight: [V, H] LM-head weight; bias: [V] or None.
        targets: [N] long next-token ids.
        chunk_size: positions per chunk (peak extra memory ≈ chunk_size × V floats).
        temperature: logits are divided by it (sampling temperature of online RL).
        stats: names from TOKEN_STATS to compute from the same (temperature-scaled) logits, no gradient
            (`token_stats`; no extra LM-head pass).
    Returns:
        [N] log-probabilities (gradients flow to hidden, weight and bias), or with `stats`
        (log-probabilities [N], {name: [N]}).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0)
        return (empty, {k: empty.detach() for k in stats}) if stats else empty
    outs = []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_grad:
            outs.append(checkpoint(_chunk_logps, h, weight, bias, t, temperature, stats, use_reentrant=False))
        else:
            outs.append(_chunk_logps(h, weight, bias, t, temperature, stats))
    if stats:
        return torch.cat([o[0] for o in outs]), {k: torch.cat([o[1][k] for o in outs]) for k in stats}
    return torch.cat(outs)


def sequence_sums(values: torch.Tensor, seq_index: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Sum per-token `values` [N] into `n_seqs` sequences by `seq_index` [N] (ids in 0..n_seqs-1)."""
    out = values.new_zeros(n_seqs)
    return out.index_add(0, seq_index, values)


def split_to_padded(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous per-sequence values [N] (sequence after sequence) → right-padded [S, T] and mask [S, T].

    Args:
        values: [N] with N = lengths.sum(); lengths: [S] long.
    Returns:
        (padded [S, T] with zeros in padding, mask [S, T] bool), T = max(lengths) (at least 1).
    """
    S = lengths.shape[0]
    T = max(int(lengths.max()) if S else 0, 1)
    mask = torch.arange(T, device=values.device).unsqueeze(0) < lengths.to(values.device).unsqueeze(1)
    padded = values.new_zeros(S, T)
    padded = padded.masked_scatter(mask, values)
    return padded, mask


@torch.no_grad()
def token_log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log Σ_v p_v² at each position (WPO's per-token normaliser, arXiv 2406.11827 eq. 5), chunk by chunk.

    Args:
        hidden: [N, H] final hidden states; weight: [V, H] LM head; bias: [V] or None.
    Returns:
        [N] float32 (no gradient): logsumexp(2·z) − 2·logsumexp(z) for the logits z of each position.
    """
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        z = torch.nn.functional.linear(hidden[start:start + chunk_size], weight, bias).float()
        outs.append(torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1))
    return torch.cat(outs) if outs else hidden.new_zeros(0)
