"""Packed and prefix-shared preference batches: the same sequences, without padding or repeated prompts.

The collators of `reinforge.data.collate` give every sequence its own right-padded row. A preference
step then computes padding, and computes every prompt twice (chosen and rejected; a KTO example and its
KL sequence). This module lays out the SAME S sequences differently:

- packing (`capacity` set): whole units are bin-packed, first-fit decreasing, into rows of `capacity`
  tokens (a unit longer than that gets a row of its own); position ids restart at 0 in every unit and
  attention must stay inside a unit.
- prefix sharing (arXiv 2410.20305, `share_prefix=True`): sequences whose prompt tokens are identical
  form ONE unit `prefix | branch_1 | branch_2 | ...` with prefix = prompt[:-1] and branch_k =
  prompt[-1:] + completion_k. A branch attends to the prefix and to itself, never to another branch,
  and its position ids continue from the prefix. The last prompt token opens every branch because it is
  the position that predicts the first completion token, and in this batch format one position predicts
  one target. Exact: every scored token sees the same tokens at the same positions as when alone.
  Grouping is by the tokens, so paired batches share each pair's prompt and KTO batches share
  prompt_i between example i and its KL sequence (prompt_i + completion_{i-1}).

Output: the batch format of `reinforge.data.collate` for the same S sequences in the same order
(`n_tokens`, the meaning of `seq_index`, paired/unpaired order, `labels`, `n_pairs`/`n_examples`,
`ref_logps` are unchanged), with rows laid out as above, plus
- `segment_ids` [R, L] long: the unit of each token within its row (0, 1, ...), -1 on padding;
- `branch_ids` [R, L] long, only when some unit shares a prefix: 0 on a shared prefix, k >= 1 on the
  k-th branch of its unit (a unit without sharing is one branch, 1), -1 on padding.
`attention_mask` [R, L] still marks real tokens with 1, but is NOT the attention pattern any more: a
consumer must confine attention with `segment_ids` (causal within a unit, position ids restart) and
`branch_ids` (a token sees earlier tokens of its unit on the prefix or on its own branch).
`reinforge.models.forward.LogpsModel` does; `attention_bias` builds the 4-D mask for other consumers.

The packed collators wrap a padded collator and re-lay the sequences it defines, so method-specific
logic (which sequences a batch holds, KTO's KL pairs, truncation) stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from reinforge.data.collate import IGNORE, PairedCollator, UnpairedCollator

ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "targets", "seq_index")
UNLIMITED = 2**62  # packing capacity meaning "no limit": one row per micro-batch


@dataclass
class _Unit:
    """Tokens laid out contiguously in one row: an optional shared prefix, then one branch per sequence."""

    prefix: list[int]
    branches: list[tuple[int, list[int], int]]  # (sequence index, branch tokens, index of the branch's first token)

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for _, b, _ in self.branches)


def _start(ids: list[int], n_unscored: int) -> int:
    """Index of the first scored token (as `pad_sequences`: the first token is never predicted)."""
    return min(max(n_unscored, 1), len(ids))


def _units(seqs: list[tuple[list[int], int]], share_prefix: bool, capacity: int | None) -> list[_Unit]:
    if not share_prefix:
        return [_Unit([], [(j, ids, 0)]) for j, (ids, _) in enumerate(seqs)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (ids, n_unscored) in enumerate(seqs):
        groups.setdefault(tuple(ids[:_start(ids, n_unscored)]), []).append(j)
    units = []
    for prompt, members in groups.items():
        shared = len(prompt) - 1
        unit = _Unit(list(prompt[:shared]), [(j, seqs[j][0][shared:], shared) for j in members])
        if len(members) < 2 or shared < 1 or (capacity is not None and len(unit) > capacity):
            # nothing to share, or the shared unit would not fit a row where the sequences alone do
            units.extend(_Unit([], [(j, seqs[j][0], 0)]) for j in members)
        else:
            units.append(unit)
    units.sort(key=lambda u: min(j for j, _, _ in u.branches))  # deterministic: in sequence order
    return units


def _bins(units: list[_Unit], capacity: int | None) -> list[list[_Unit]]:
    """First-fit decreasing into rows of `capacity` tokens (one unit per row when capacity is None)."""
    if capacity is None:
        return [[u] for u in units]
    rows: list[list[_Unit]] = []
    free: list[int] = []
    for unit in sorted(units, key=len, reverse=True):  # stable: ties keep sequence order
        n = len(unit)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(unit)
                free[r] -= n
                break
        else:
            rows.append([unit])
            free.append(capacity - n)
    return rows


def pack_sequences(seqs: list[tuple[list[int], int]], pad_id: int, capacity: int | None = None,
                   share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Lay out S sequences in packed and/or prefix-shared rows (see the module docstring).

    Args:
        seqs: S items (token ids, number of leading unscored tokens), as for `collate.pad_sequences`.
        pad_id: padding token id (only row ends are padded).
        capacity: tokens per row for bin-packing; None = one unit per row (no packing).
        share_prefix: share identical prompts between sequences.
    Returns:
        input_ids, attention_mask, position_ids, targets, seq_index, segment_ids [R, L];
        branch_ids [R, L] when some unit shares a prefix; n_tokens [S].
        R and L depend on the layout; L is the longest row.
    Raises:
        ValueError: capacity < 1 or an empty sequence.
    """
    if capacity is not None and capacity < 1:
        raise ValueError(f"packing capacity must be >= 1 token, got {capacity}")
    if any(len(ids) == 0 for ids, _ in seqs):
        raise ValueError("cannot pack an empty sequence")
    rows = _bins(_units(seqs, share_prefix, capacity), capacity)
    R, L = len(rows), max(sum(len(u) for u in row) for row in rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    attention = torch.zeros((R, L), dtype=torch.long)
    positions = torch.zeros((R, L), dtype=torch.long)
    targets = torch.full((R, L), IGNORE, dtype=torch.long)
    seq_index = torch.full((R, L), -1, dtype=torch.long)
    segments = torch.full((R, L), -1, dtype=torch.long)
    branches = torch.full((R, L), -1, dtype=torch.long)
    n_tokens = torch.zeros(len(seqs), dtype=torch.long)
    shared_any = False
    for r, row in enumerate(rows):
        col = 0
        for u, unit in enumerate(row):
            P = len(unit.prefix)
            shared_any |= P > 0
            if P:
                input_ids[r, col:col + P] = torch.tensor(unit.prefix, dtype=torch.long)
                positions[r, col:col + P] = torch.arange(P)
                branches[r, col:col + P] = 0
                segments[r, col:col + P] = u
                col += P
            for k, (j, tokens, first) in enumerate(unit.branches, start=1):
                ids, n_unscored = seqs[j]
                n = len(tokens)
                start = _start(ids, n_unscored)
                full = torch.tensor(ids, dtype=torch.long)
                input_ids[r, col:col + n] = full[first:]
                positions[r, col:col + n] = torch.arange(first, first + n)
                branches[r, col:col + n] = k
                segments[r, col:col + n] = u
                # token t (column col + t - first) predicts token t + 1; scored for t in [start - 1, len - 2]
                a, b = col + start - 1 - first, col + len(ids) - 1 - first
                targets[r, a:b] = full[start:]
                seq_index[r, a:b] = j
                n_tokens[j] = len(ids) - start
                col += n
        attention[r, :col] = 1
        positions[r, col:] = torch.arange(L - col)  # padding restarts positions: a "sequence" of its own
    batch = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "targets": targets,
             "seq_index": seq_index, "segment_ids": segments, "n_tokens": n_tokens}
    if shared_any:
        batch["branch_ids"] = branches
    return batch


def unpad_sequences(batch: dict[str, Any]) -> list[tuple[list[int], int]]:
    """Inverse of `collate.pad_sequences`: a one-row-per-sequence batch → [(token ids, unscored tokens)].

    The second item is the index of the first scored token, which `pad_sequences` maps to the same targets.
    Raises: ValueError when the batch is not one row per sequence (e.g. already packed).
    """
    if "segment_ids" in batch or batch["input_ids"].shape[0] != batch["n_tokens"].shape[0]:
        raise ValueError("unpad_sequences needs a batch with one row per sequence (a padded collator's output)")
    seqs = []
    for r in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r, :n].tolist()
        scored = (batch["seq_index"][r, :n] == r).nonzero()
        start = int(scored[0]) + 1 if scored.numel() else n
        seqs.append((ids, start))
    return seqs


class PackedCollator:
    """Wrap a padded collator (`PairedCollator`, `UnpairedCollator`): same rows in, same S sequences out,
    laid out packed and/or prefix-shared (`pack_sequences`).

    Args:
        inner: a collator returning one row per sequence (the format of `collate.pad_sequences`).
        pad_id: padding token id.
        capacity: tokens per packed row, or None for one unit per row.
        share_prefix: share identical prompts (prefix sharing).
    Every key of the inner batch that is not a row tensor (`n_pairs`, `labels`, `n_examples`, `ref_logps`,
    ...) is passed through unchanged; so is `n_tokens` (checked equal).
    """

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]], pad_id: int,
                 capacity: int | None = None, share_prefix: bool = True):
        if capacity is None and not share_prefix:
            raise ValueError("PackedCollator with neither packing nor prefix sharing: use the inner collator")
        self.inner, self.pad_id, self.capacity, self.share_prefix = inner, pad_id, capacity, share_prefix

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return relayout(self.inner(rows), self.pad_id, self.capacity, self.share_prefix)

    def with_global_batch(self, rows: list[dict[str, Any]], global_rows: list[dict[str, Any]],
                          offset: int) -> list[dict[str, Any]]:
        """The inner collator's `with_global_batch` (rows that depend on the whole global micro-batch), or `rows`
        unchanged when it has none."""
        hook = getattr(self.inner, "with_global_batch", None)
        return hook(rows, global_rows, offset) if hook is not None else rows


def relayout(padded: dict[str, Any], pad_id: int, capacity: int | None, share_prefix: bool) -> dict[str, Any]:
    """A one-row-per-sequence batch (`collate.pad_sequences` format, plus any non-row keys) → the same S
    sequences packed and/or prefix-shared (`pack_sequences`); non-row keys pass through unchanged."""
    packed = pack_sequences(unpad_sequences(padded), pad_id, capacity, share_prefix)
    if not torch.equal(packed["n_tokens"], padded["n_tokens"]):
        raise AssertionError("packing changed the scored tokens per sequence")  # a bug, never data
    out = {k: v for k, v in padded.items() if k not in ROW_KEYS}
    out.update(packed)
    return out


def layout_of(cfg: Any) -> tuple[int | None, bool]:
    """(packing capacity or None, share prompts) from the config's performance keys (`sample_packing_value`,
    `packing_length_value`, `prefix_sharing_value`)."""
    capacity = (cfg.packing_length_value or UNLIMITED) if cfg.sample_packing_value else None
    return capacity, cfg.prefix_sharing_value


def batch_layout(cfg: Any, pad_id: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """batch → batch: `relayout` per the config, or the identity when neither packing nor sharing is on.
    Used by the online loop on its one-row-per-completion rollout batches."""
    capacity, share = layout_of(cfg)
    if capacity is None and not share:
        return lambda batch: batch
    return lambda batch: relayout(batch, pad_id, capacity, share)


def attention_bias(segment_ids: torch.Tensor, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The attention pattern of a packed/prefix-shared batch as a boolean [R, 1, L, L] mask (True = attend).

    Query i sees key j <= i of the same unit (`segment_ids`) when j is on the shared prefix (branch 0) or on
    i's own branch; padding tokens see earlier padding only (every query row has at least itself, so no
    softmax over an empty set).
    """
    L = segment_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if branch_ids is not None:
        bk = branch_ids[:, None, :]
        allowed = allowed & ((bk == 0) | (bk == branch_ids[:, :, None]))
    return allowed.unsqueeze(1)


def build_collator(cfg: Any, kind: str, pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The training/eval collator for an offline method, per the config's performance keys.

    Args:
        cfg: a `ReinforgeConfig` (reads `sample_packing_value`, `prefix_sharing_value`, `packing_length_value`
            and `sequence_len`).
        kind: "paired" (DPO family, ORPO, SimPO) or "unpaired" (KTO).
        pad_id: the tokenizer's padding id.
    Raises: ValueError for another kind.
    """
    if kind == "paired":
        inner: Callable = PairedCollator(pad_id)
    elif kind == "unpaired":
        inner = UnpairedCollator(pad_id, max_length=cfg.sequence_len)
    else:
        raise ValueError(f"no preference collator for data kind {kind!r}")
    capacity, share = layout_of(cfg)
    if capacity is None and not share:
        return inner
    return PackedCollator(inner, pad_id, capacity=capacity, share_prefix=share)


__all__ = ["UNLIMITED", "PackedCollator", "attention_bias", "batch_layout", "build_collator", "layout_of", "pack_sequences",
           "relayout", "unpad_sequences"]
