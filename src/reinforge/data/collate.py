"""Collators: tokenised rows → model batches in which each scored token knows its sequence.

A batch holds R rows of L tokens and S scored sequences:
- `input_ids` [R, L] long, `attention_mask` [R, L] long (1 = real token), `position_ids` [R, L];
- `targets` [R, L] long: the next token at each position that predicts a completion token, else -100
  (prompt tokens are never scored);
- `seq_index` [R, L] long: which of the S sequences a scored position belongs to, else -1;
- `n_tokens` [S]: scored tokens per sequence.
Paired batches list sequences as [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]; unpaired as
[completion_0..completion_{B-1}] (plus `labels` [B] bool).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def pad_sequences(seqs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per sequence, right-padded. Each item is (token ids, number of leading unscored tokens).

    Returns the tensors described in the module docstring, with S = R = len(seqs).
    """
    length = max(len(ids) for ids, _ in seqs)
    R = len(seqs)
    input_ids = torch.full((R, length), pad_id, dtype=torch.long)
    attention = torch.zeros((R, length), dtype=torch.long)
    targets = torch.full((R, length), IGNORE, dtype=torch.long)
    seq_index = torch.full((R, length), -1, dtype=torch.long)
    n_tokens = torch.zeros(R, dtype=torch.long)
    for r, (ids, n_unscored) in enumerate(seqs):
        n = len(ids)
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, :n] = t
        attention[r, :n] = 1
        start = max(n_unscored, 1)  # the first token is never predicted
        # position p predicts token p+1: scored positions are start-1 .. n-2
        targets[r, start - 1 : n - 1] = t[start:]
        seq_index[r, start - 1 : n - 1] = r
        n_tokens[r] = n - start
    position_ids = torch.arange(length).unsqueeze(0).expand(R, -1).clone()
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
            "targets": targets, "seq_index": seq_index, "n_tokens": n_tokens}


class PairedCollator:
    """Rows with prompt_ids/chosen_ids/rejected_ids → a padded batch of 2B sequences."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [(r["prompt_ids"] + r["chosen_ids"], len(r["prompt_ids"])) for r in rows]
        seqs += [(r["prompt_ids"] + r["rejected_ids"], len(r["prompt_ids"])) for r in rows]
        batch = pad_sequences(seqs, self.pad_id)
        batch["n_pairs"] = len(rows)
        _add_ref(batch, rows, ("ref_chosen_logps", "ref_rejected_logps"))
        return batch


class UnpairedCollator:
    """Rows with prompt_ids/completion_ids/label → one batch of 2B sequences for KTO, plus `labels` [B].

    Sequence order (S = 2B; `n_tokens`, `seq_index` and the model's `logps` follow it):
      0 .. B-1:   prompt_i + completion_i                 (the examples, in row order);
      B .. 2B-1:  prompt_i + completion_{(i-1) mod B}     (mismatched pairs for KTO's KL reference point).
    The mismatched pairs rotate the batch's completions by one, as TRL 1.16's KTOTrainer does per batch
    ((x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})), so the KL term uses the same completions as the rewards,
    each after another prompt; one forward pass scores both. With B = 1 the "mismatched" pair is the
    example itself (the config requires micro_batch_size >= 2; a last partial batch of one row can still
    occur, as in TRL). `labels` [B] bool (True = desirable); `n_examples` = B.
    A row that carries `kl_completion_ids` (set by `with_global_batch`) uses those instead of its neighbour's
    completion: with several processes the rotation runs over the global micro-batch, so N processes pair the
    same (prompt, completion) as one process with the whole batch (TRL rotates within each device's batch).

    Args:
        pad_id: padding token id.
        max_length: if set, a mismatched sequence longer than this keeps its first `max_length` tokens
            (TRL's collator truncation; the examples themselves were fitted at tokenisation).
    Raises (on call): ValueError for a row without a bool `label`, or rows carrying precomputed reference
        log-probs (the mismatched pairs depend on the shuffled batch, so they cannot be precomputed per row).
    """

    def __init__(self, pad_id: int, max_length: int | None = None):
        self.pad_id = pad_id
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        for i, r in enumerate(rows):
            if not isinstance(r.get("label"), bool):
                raise ValueError(f"KTO row {i} needs a bool `label` (True = desirable), got {r.get('label')!r}")
        if any("ref_logps" in r for r in rows):
            raise ValueError("precomputed reference log-probs are not supported for KTO: the mismatched KL pairs "
                             "change with every shuffled batch")
        B = len(rows)
        seqs = [(r["prompt_ids"] + r["completion_ids"], len(r["prompt_ids"])) for r in rows]
        for i, r in enumerate(rows):
            kl_completion = r["kl_completion_ids"] if "kl_completion_ids" in r else rows[(i - 1) % B]["completion_ids"]
            ids = r["prompt_ids"] + kl_completion
            if self.max_length is not None:
                ids = ids[: self.max_length]
            seqs.append((ids, min(len(r["prompt_ids"]), len(ids))))
        batch = pad_sequences(seqs, self.pad_id)
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
        batch["n_examples"] = B
        return batch

    @staticmethod
    def with_global_batch(rows: list[dict[str, Any]], global_rows: list[dict[str, Any]],
                          offset: int) -> list[dict[str, Any]]:
        """This process's `rows` (copies), each with `kl_completion_ids`: the completion of the previous row of
        the global micro-batch `global_rows` (rotated by one over all processes' rows), where `rows` are
        `global_rows[offset:offset + len(rows)]`. With one process (offset 0, rows = global_rows) this is the
        in-batch rotation of `__call__`.

        Raises: ValueError when `rows` is not that slice of `global_rows`.
        """
        part = global_rows[offset:offset + len(rows)]
        if len(part) != len(rows) or any(a is not b for a, b in zip(part, rows)):
            raise ValueError(f"rows are not global_rows[{offset}:{offset + len(rows)}]")
        G = len(global_rows)
        return [{**r, "kl_completion_ids": global_rows[(offset + i - 1) % G]["completion_ids"]}
                for i, r in enumerate(rows)]


def _add_ref(batch: dict[str, Any], rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Carry precomputed reference log-probs, when the rows have them, as one [S] tensor."""
    if all(k in rows[0] for k in keys):
        batch["ref_logps"] = torch.cat([torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in keys])
