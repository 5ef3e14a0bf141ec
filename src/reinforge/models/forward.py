"""The forward pass that training needs: log-probs of completion tokens only.

`LogpsModel` wraps a causal LM (plain or peft). Its forward runs the decoder, keeps the final hidden
states at scored positions only (`targets != -100`), and applies the LM head chunk by chunk
(`reinforge.algorithms.logprobs.chunked_token_logps`), so the [rows, length, vocab] logits tensor
never exists. `chunked=False` uses the model's own full-logits forward (the reference path for tests).
Being one nn.Module, it is what accelerate wraps for DDP/FSDP.
"""

from __future__ import annotations

import torch
from torch import nn

from reinforge.algorithms.logprobs import chunked_token_logps, selective_logps, sequence_sums


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LogpsModel(nn.Module):
    """Causal LM → per-token and per-sequence log-probs of the scored (completion) tokens.

    Args:
        model: a transformers causal LM, possibly a peft model.
        chunk_size: positions per LM-head chunk.
        chunked: False → compute full logits through the model's own forward (exact reference path).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, chunked: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        inner = _unwrap_peft(model)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        self.chunked = chunked and softcap is None and hasattr(inner, inner.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                targets: torch.Tensor, seq_index: torch.Tensor, n_tokens: torch.Tensor, temperature: float = 1.0,
                **_: object) -> dict[str, torch.Tensor]:
        """Args: the batch tensors of `reinforge.data.collate` ([R, L] each; `n_tokens` [S] gives S).

        Returns:
            token_logps [N]: log p of each scored token, in row-major order of `targets != -100`;
            token_seq [N]: the sequence of each scored token;
            logps [S]: per-sequence sums.
        """
        mask = targets != -100
        tgt = targets[mask]
        if self.chunked:
            inner = _unwrap_peft(self.model)
            decoder = getattr(inner, inner.base_model_prefix)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            head = inner.get_output_embeddings()
            tok = chunked_token_logps(hidden[mask], head.weight, head.bias, tgt, self.chunk_size, temperature)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).logits
            if temperature != 1.0:
                logits = logits / temperature
            tok = selective_logps(logits[mask], tgt)
        seq = seq_index[mask]
        return {"token_logps": tok, "token_seq": seq, "logps": sequence_sums(tok, seq, n_tokens.shape[0])}
