"""The forward pass that training needs: log-probs of completion tokens only.

`LogpsModel` wraps a causal LM (plain or peft). Its forward runs the decoder, keeps the final hidden
states at scored positions only (`targets != -100`), and applies the LM head chunk by chunk
(`reinforge.algorithms.logprobs.chunked_token_logps`), so the [rows, length, vocab] logits tensor
never exists. `chunked=False` uses the model's own full-logits forward (the reference path for tests).
Being one nn.Module, it is what accelerate wraps for DDP/FSDP.

Packed and prefix-shared batches (`reinforge.data.packing`: extra keys `segment_ids`, `branch_ids`)
need attention confined to each unit and branch. Three ways, chosen per model:
- segment attention (models whose attention implementation is sdpa, full causal attention everywhere,
  no attention soft-capping): the model's attention implementation becomes `reinforge_sdpa`, which is
  exactly sdpa for ordinary batches and, for packed ones, runs sdpa per unit and branch (keys = the
  unit's prefix and the branch itself). Attention then costs Σ per-unit lengths², not rows × L², and
  the layout of rows does not matter;
- otherwise, packing without shared prefixes: no attention mask and position ids restarting per unit,
  which transformers recognises as packed sequences (sdpa/eager/flex masks, flash-attention varlen);
- otherwise, prefix sharing: a 4-D mask (`reinforge.data.packing.attention_bias`; boolean for sdpa,
  additive for eager). Models with sliding-window or other non-causal layer types, and attention
  implementations that take no 4-D mask (flash-attention), raise ValueError: set `prefix_sharing: false`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reinforge.algorithms.logprobs import (chunked_token_logps, selective_logps, sequence_sums, token_log_sum_sq_probs,
                                           token_stats)
from reinforge.data.packing import attention_bias

SEGMENT_ATTENTION = "reinforge_sdpa"
LAYOUT_KWARG = "reinforge_segments"


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------- segment attention (sdpa per unit)

def _segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: sdpa, restricted to the units/branches of a packed batch.

    Args: query [R, Hq, L, D], key/value [R, Hkv, L, D] (rotary already applied); `reinforge_segments`
    (kwarg) = the layout from `segment_layout`, or absent for an ordinary batch (then plain sdpa).
    Returns: ([R, L, Hq, D], None), the layout of transformers' `sdpa_attention_forward`.
    """
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for r, pieces in enumerate(layout):
        outs = []
        for a, b, prefix, mask in pieces:
            if prefix is None:  # padding: attends nowhere that matters, output 0
                outs.append(query.new_zeros(1, query.shape[1], b - a, query.shape[3]))
                continue
            q = query[r:r + 1, :, a:b]
            if prefix[1] > prefix[0]:
                k = torch.cat([key[r:r + 1, :, prefix[0]:prefix[1]], key[r:r + 1, :, a:b]], dim=2)
                v = torch.cat([value[r:r + 1, :, prefix[0]:prefix[1]], value[r:r + 1, :, a:b]], dim=2)
            else:
                k, v = key[r:r + 1, :, a:b], value[r:r + 1, :, a:b]
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                       is_causal=mask is None, scale=scaling, enable_gqa=gqa))
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def segment_layout(segment_ids: torch.Tensor, branch_ids: torch.Tensor | None) -> list[list[tuple]]:
    """Per row, the pieces `_segment_attention` computes: (start, end, prefix span, mask).

    A piece is a run of columns [start, end) with one unit and branch. prefix span = (a, b) of the unit's
    shared prefix (empty (0, 0) for a prefix itself or an unshared unit), or None for padding; mask = None
    for plain causal attention, else a boolean [end - start, prefix + end - start] mask (True = attend):
    the whole prefix, then causal within the branch.
    """
    seg = segment_ids.tolist()
    br = branch_ids.tolist() if branch_ids is not None else None
    layout = []
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for r, srow in enumerate(seg):
        brow = br[r] if br is not None else [1] * len(srow)
        pieces, start, prefix_of = [], 0, {}
        for c in range(1, len(srow) + 1):
            if c < len(srow) and srow[c] == srow[start] and brow[c] == brow[start]:
                continue
            s, b = srow[start], brow[start]
            if s < 0:
                pieces.append((start, c, None, None))
            elif b == 0:
                prefix_of[s] = (start, c)
                pieces.append((start, c, (0, 0), None))
            else:
                p = prefix_of.get(s, (0, 0))
                P, n = p[1] - p[0], c - start
                mask = None
                if P:
                    mask = masks.get((P, n))
                    if mask is None:
                        mask = torch.ones(n, P + n, dtype=torch.bool, device=segment_ids.device).tril(P)
                        masks[(P, n)] = mask
                pieces.append((start, c, p, mask))
            start = c
        layout.append(pieces)
    return layout


def _plain_causal(config: Any) -> bool:
    """True when every layer is full causal attention without soft-capping (the segment/4-D mask paths apply)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "attn_logit_softcapping", None) is None and getattr(config, "is_causal", True)


class LogpsModel(nn.Module):
    """Causal LM → per-token and per-sequence log-probs of the scored (completion) tokens.

    Args:
        model: a transformers causal LM, possibly a peft model.
        chunk_size: positions per LM-head chunk.
        chunked: False → compute full logits through the model's own forward (exact reference path).
        segment_attention: for sdpa models with full causal attention, switch the model's attention
            implementation to `reinforge_sdpa` (identical to sdpa for ordinary batches) so that packed and
            prefix-shared batches attend per unit. False keeps the model as it is (transformers' packed
            sequence handling, or a 4-D mask for prefix sharing).
        log_sum_sq: also return WPO's `token_log_sum_sq_probs`.
        stats: token statistics (`algorithms.logprobs.TOKEN_STATS`) every forward returns, for metrics.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, chunked: bool = True,
                 segment_attention: bool = True, log_sum_sq: bool = False, stats: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.stats = tuple(stats)  # token statistics every forward returns (see forward)
        self.chunk_size = chunk_size
        self.log_sum_sq = log_sum_sq  # also return token_log_sum_sq_probs (WPO)
        inner = _unwrap_peft(model)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        self.chunked = chunked and softcap is None and hasattr(inner, inner.base_model_prefix)
        self._plain = _plain_causal(inner.config)
        impl = inner.config._attn_implementation
        if segment_attention and self._plain and impl == "sdpa":
            _register_segment_attention()
            inner.set_attn_implementation(SEGMENT_ATTENTION)
        elif not segment_attention and impl == SEGMENT_ATTENTION:
            inner.set_attn_implementation("sdpa")

    @property
    def attn_implementation(self) -> str:
        """The wrapped model's attention implementation (`reinforge_sdpa` when segment attention is on)."""
        return _unwrap_peft(self.model).config._attn_implementation

    def _attention_inputs(self, attention_mask: torch.Tensor, segment_ids: torch.Tensor | None,
                          branch_ids: torch.Tensor | None, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
        """(attention_mask to pass to the model, extra model kwargs) for this batch's layout."""
        if segment_ids is None:
            return attention_mask, {}
        impl = self.attn_implementation
        if impl == SEGMENT_ATTENTION:
            # The attention reads the layout, not the mask. A 4-D mask skips transformers' mask building (an
            # R × L × L tensor); this one is a zero-memory view meaning "attend nowhere", so that any other
            # reader would produce NaN rather than silently attend across sequences.
            R, L = segment_ids.shape
            nowhere = torch.zeros((), dtype=torch.bool, device=segment_ids.device).expand(R, 1, L, L)
            return nowhere, {LAYOUT_KWARG: segment_layout(segment_ids, branch_ids)}
        if branch_ids is None:
            return None, {}  # transformers detects packed sequences from the restarting position ids
        if not self._plain:
            raise ValueError("prefix sharing needs full causal attention in every layer; this model has sliding-"
                             "window or soft-capped attention: set prefix_sharing: false")
        bias = attention_bias(segment_ids, branch_ids)
        if impl == "sdpa":
            return bias, {}
        if impl == "eager":
            return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, torch.finfo(dtype).min), {}
        raise ValueError(f"prefix sharing needs sdpa or eager attention (a 4-D mask); the model uses {impl!r}: set "
                         "prefix_sharing: false")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                targets: torch.Tensor, seq_index: torch.Tensor, n_tokens: torch.Tensor, temperature: float = 1.0,
                segment_ids: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                stats: tuple[str, ...] | None = None, **_: object) -> dict[str, torch.Tensor]:
        """Args: the batch tensors of `reinforge.data.collate` ([R, L] each; `n_tokens` [S] gives S), and for
        packed/prefix-shared batches `segment_ids`/`branch_ids` [R, L] (`reinforge.data.packing`).

        Returns:
            token_logps [N]: log p of each scored token, sequence by sequence (sequence 0 first), each
                sequence's tokens in order — for one-row-per-sequence batches this is the row-major order
                of `targets != -100`;
            token_seq [N]: the sequence of each scored token (non-decreasing);
            logps [S]: per-sequence sums;
            token_<stat> [N] for each of `stats` (default: the module's `stats`): "entropy" (nats),
                "mean_logits", "is_top1" of the (temperature-scaled) next-token distribution at each scored
                position, no gradient (`algorithms.logprobs.token_stats`; TRL's `entropy`, `logits/*` and
                `mean_token_accuracy` metrics).
        """
        stats = self.stats if stats is None else tuple(stats)
        flat = (targets != -100).flatten().nonzero().squeeze(1)
        seq = seq_index.flatten()[flat]
        order = torch.sort(seq, stable=True).indices
        flat, seq = flat[order], seq[order]
        tgt = targets.flatten()[flat]
        inner = _unwrap_peft(self.model)
        dtype = inner.get_output_embeddings().weight.dtype
        mask, extra = self._attention_inputs(attention_mask, segment_ids, branch_ids, dtype)
        if self.chunked:
            decoder = getattr(inner, inner.base_model_prefix)
            hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=False, **extra).last_hidden_state
            head = inner.get_output_embeddings()
            selected = hidden.flatten(0, 1)[flat]
            tok = chunked_token_logps(selected, head.weight, head.bias, tgt, self.chunk_size, temperature, stats=stats)
            tok, stat_values = tok if stats else (tok, {})
            if self.log_sum_sq:
                sum_sq = token_log_sum_sq_probs(selected.detach(), head.weight.detach(),
                                                None if head.bias is None else head.bias.detach(), self.chunk_size)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False, **extra).logits
            if temperature != 1.0:
                logits = logits / temperature
            picked = logits.flatten(0, 1)[flat]
            tok = selective_logps(picked, tgt)
            stat_values = token_stats(picked, tgt, stats)
            if self.log_sum_sq:
                with torch.no_grad():
                    z = picked.float()
                    sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
        out = {"token_logps": tok, "token_seq": seq, "logps": sequence_sums(tok, seq, n_tokens.shape[0])}
        if self.log_sum_sq:
            out["token_log_sum_sq_probs"] = sum_sq.to(tok.dtype)  # WPO weights (dpo_use_weighting)
        out.update({f"token_{k}": v.to(tok.dtype) for k, v in stat_values.items()})
        return out


__all__ = ["LogpsModel", "segment_layout", "SEGMENT_ATTENTION"]
