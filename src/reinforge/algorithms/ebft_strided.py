"""EBFT's strided mode: many short rollouts of one document, generated and scored in parallel in one sequence.

A document x of L tokens gets anchors a_k every `stride` tokens from its first anchor on (while a full block of
ground truth fits: a_k + g ≤ L). At each anchor n blocks of g tokens are sampled; the ground truth of anchor k is
x[a_k : a_k + g]. Instead of B = K·n separate sequences (context + block), one *layout* holds the document
followed by the B blocks:

    index:     0 … L−1 | L … L+g−1 | L+g … L+2g−1 | …        (block b = k·n + s occupies L + b·g …)
    position:  0 … L−1 | a_0 … a_0+g−1 | a_0 … a_0+g−1 | …  (a block continues the document at its anchor)

and a block attention mask: a document token attends causally to the document; token i of block b attends to
the document before its anchor (x[0 : a_k]) and to tokens 0..i of its own block. Token i of block b is
predicted from the output at `pred_index[b, i]`: the document position a_k − 1 for i = 0, the block's own
token i − 1 otherwise — so each block's log-probs are exactly those of `x[:a_k] + block` scored as a causal
sequence of its own (tests/unit/test_ebft_strided.py checks it in float64), and each block's advantage reaches
that block's tokens only. The document positions a_k … a_k + g − 1 of the same forward give the ground-truth
features (they see x[: a_k + i + 1], as the ground truth continuing the context would).

Shapes: K anchors, n samples, g = generate_max_len, B = K·n, S = L + B·g.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def strided_anchors(length: int, first: int, stride: int, block: int) -> list[int]:
    """Anchor positions first, first + stride, … with a full ground-truth block after each (a + block ≤ length).

    Args: length L of the document; first anchor (≥ 1: a block needs one token of context); stride ≥ 1;
    block g ≥ 1. Returns: the anchors (possibly none).
    """
    first = max(first, 1)
    return list(range(first, length - block + 1, stride))


class BlockLayout(NamedTuple):
    """Where everything is in a strided layout (see module docstring).

    doc_len: L. anchors: [K] long. num_samples: n. block: g.
    positions: [S] position ids. allowed: [S, S] bool attention mask (query × key, True = attend).
    block_index: [B, g] layout index of each block token. pred_index: [B, g] layout index whose output predicts it.
    gt_index: [K, g] document indices of each anchor's ground-truth block.
    """

    doc_len: int
    anchors: torch.Tensor
    num_samples: int
    block: int
    positions: torch.Tensor
    allowed: torch.Tensor
    block_index: torch.Tensor
    pred_index: torch.Tensor
    gt_index: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.block_index.shape[0]


def block_layout(doc_len: int, anchors: list[int], num_samples: int, block: int) -> BlockLayout:
    """The layout of a document of `doc_len` tokens with `num_samples` blocks of `block` tokens at each anchor.

    Raises: ValueError when there is no anchor, or an anchor leaves no context or no full ground-truth block.
    """
    if not anchors:
        raise ValueError("a strided layout needs at least one anchor")
    if min(anchors) < 1 or max(anchors) + block > doc_len:
        raise ValueError(f"anchors {anchors} need 1 <= a and a + {block} <= {doc_len}")
    L, n, g = doc_len, num_samples, block
    a = torch.tensor(anchors, dtype=torch.long)
    K = a.shape[0]
    B = K * n
    S = L + B * g
    block_anchor = a.repeat_interleave(n)  # [B]
    offsets = torch.arange(g)
    block_index = L + torch.arange(B).unsqueeze(1) * g + offsets  # [B, g]
    positions = torch.cat([torch.arange(L), (block_anchor.unsqueeze(1) + offsets).flatten()])
    allowed = torch.zeros(S, S, dtype=torch.bool)
    allowed[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    context = torch.arange(L).unsqueeze(0) < block_anchor.unsqueeze(1)  # [B, L]
    allowed[L:, :L] = context.repeat_interleave(g, dim=0)
    block_of = torch.arange(B).repeat_interleave(g)  # block tokens: causal within their own block
    allowed[L:, L:] = (block_of.unsqueeze(1) == block_of.unsqueeze(0)) & torch.ones(B * g, B * g, dtype=torch.bool).tril()
    pred_index = torch.cat([(block_anchor - 1).unsqueeze(1), block_index[:, :-1]], dim=1)
    gt_index = a.unsqueeze(1) + offsets
    return BlockLayout(L, a, n, g, positions, allowed, block_index, pred_index, gt_index)


def layout_ids(document: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The token ids of a layout: document [L] then the blocks [B, g] flattened → [S]."""
    return torch.cat([document, blocks.flatten()])


def block_logps(logits: torch.Tensor, layout: BlockLayout, blocks: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of each block token under the layout's forward.

    Args: logits [S, V] of the layout; blocks [B, g] token ids; temperature the logits are divided by.
    Returns: [B, g] log π(token), differentiable in `logits`.
    """
    return token_logps(logits[layout.pred_index.flatten()], blocks, temperature)


def token_logps(pred_logits: torch.Tensor, blocks: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`block_logps` from the logits of the predicting rows only: pred_logits [B·g, V] (row b·g + i predicts token
    i of block b, i.e. the layout's `pred_index` rows). Softmax in float32 at least. Returns [B, g]."""
    x = pred_logits if pred_logits.dtype == torch.float64 else pred_logits.float()
    logp = torch.log_softmax(x / temperature, dim=-1)
    return logp.gather(1, blocks.reshape(-1, 1).to(logp.device)).view(blocks.shape)


def strided_policy_loss(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE over the blocks: −mean_{b, i} A_b · log π(token_{b,i}) (each block's advantage on its own g tokens).

    Args: logps [B, g] (with gradient); advantages [B] (no gradient). Returns: 0-d loss.
    """
    return -(advantages.detach().unsqueeze(1) * logps).mean()


def document_ce(logits: torch.Tensor, document: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the document's own tokens (next-token prediction on the document part of the layout).

    Args: logits [≥ L−1, V] of the layout's first rows (the document's); document [L]; loss_mask [L] 1 on the
    tokens that count (e.g. completion tokens of a prompt/completion row; token 0 is never predicted).
    Returns: 0-d mean NLL over the counted tokens 1..L−1 (0 when there is none).
    """
    L = document.shape[0]
    logp = torch.log_softmax(logits[: L - 1].float() if logits.dtype != torch.float64 else logits[: L - 1], dim=-1)
    nll = -logp.gather(1, document[1:].unsqueeze(1)).squeeze(1)
    m = loss_mask[1:].to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1.0)
