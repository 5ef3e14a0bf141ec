"""In-process generation: `transformers` `generate` on the policy itself (batched, KV-cached, EOS-aware).

Prompts are left-padded into one batch, each repeated n times; sampling uses transformers' logits
processors (temperature, top-p, top-k, min-p, repetition penalty). The backend shares the policy's
weights, so there is nothing to sync. It runs the training module and samples from torch's global RNG
(forked and seeded per call, restored after), so it is not safe in a background thread:
`thread_safe = False`, and the producer runs it on the main thread.
"""

from __future__ import annotations

import torch

from reinforge.rollout.types import Completions, SamplingParams


class InProcessBackend:
    """Generate with the policy module (plain or peft) in eval mode, KV cache on.

    Args:
        model: the causal LM (or peft model) being trained.
        pad_token_id, eos_token_ids: ids used for padding and stopping.
        max_batch: completions generated in one `generate` call (memory bound).
    """

    thread_safe = False
    name = "in-process"

    def __init__(self, model, pad_token_id: int, eos_token_ids: list[int], max_batch: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.max_batch = max_batch

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None = None) -> Completions:
        """Sample `params.n` completions per prompt, prompt-major. With `seed`, sampling runs under torch's RNG
        seeded with it and the global RNG state is restored afterwards. No sampler log-probs (the policy
        forward that follows computes the same distribution)."""
        expanded = [p for p in prompt_ids for _ in range(params.n)]
        completions: list[list[int]] = []
        truncated: list[bool] = []
        was_training = self.model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(expanded), self.max_batch):
                    ids, trunc = self._generate_batch(expanded[start:start + self.max_batch], params)
                    completions += ids
                    truncated += trunc
        finally:
            self.model.train(was_training)
        return Completions(completion_ids=completions, truncated=truncated)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list[bool]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        device = next(self.model.parameters()).device
        kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                      min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                      max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_token_id,
                      eos_token_id=self.eos_token_ids, use_cache=True, **params.extra)
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        return cut_at_eos(out[:, width:].tolist(), self.eos_token_ids)


def cut_at_eos(rows: list[list[int]], eos_token_ids: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first EOS; rows without EOS are kept whole and flagged truncated."""
    eos = set(eos_token_ids)
    completions, truncated = [], []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in eos), None)
        if end is None:
            completions.append(row)  # no EOS: every one of max_new_tokens tokens is real
            truncated.append(True)
        else:
            completions.append(row[: end + 1])
            truncated.append(False)
    return completions, truncated
