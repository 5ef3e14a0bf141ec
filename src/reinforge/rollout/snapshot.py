"""In-process generation from a frozen snapshot of the policy's weights, safe in a background thread.

For async GRPO a producer thread samples the next rollout while the main thread trains the policy. Sampling
from the training module itself (`InProcessBackend`) is not safe then: its weights change under the optimiser
and `generate` uses torch's global RNG. Here the backend owns a separate plain `transformers` causal LM:

- `SnapshotSync` (a `WeightSync`): `push(model, version)` copies the policy's current weights (a peft LoRA policy
  merged W + ΔW by `merged_state_dict`, without touching the training module) into the snapshot module, built
  once from the policy's config and then overwritten in place (`load_state_dict`) on every later push.
- `SnapshotBackend`: a batched, KV-cached, EOS-aware decode loop over the snapshot with transformers' logits
  processors, sampling with private `torch.Generator`s (one per completion, seeded from the call's seed and the
  completion's index), so it never reads or changes torch's global RNG and its output does not depend on
  `max_batch`. It returns the sampler's processed log-probs, like the vLLM backend.

Threading contract: the producer thread may call `SnapshotBackend.generate` while the main thread trains the
policy (they share no tensors: the snapshot holds its own copy). The snapshot is only replaced by
`SnapshotSync.push`, which the caller runs on the main thread while no generation is in flight; a lock makes a
`push` issued during a `generate` wait until that generation has finished, so a rollout never mixes weights.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import secrets
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from reinforge.rollout.sync import merged_state_dict
from reinforge.rollout.types import Completions, SamplingParams


class SnapshotSync:
    """A `WeightSync` that keeps a frozen copy of the policy's weights for `SnapshotBackend` (`needed = True`).

    Args:
        dtype: floating dtype of the snapshot (torch.float32 default; torch.bfloat16 halves its memory and, on
            CPUs with bf16 support, speeds up sampling; log-probs are then those of the bf16 model).
        device: where the snapshot lives; None: the policy's device at the first push. On an accelerator the
            snapshot costs a second copy of the weights there.

    Attributes:
        model: the snapshot (a plain `transformers` causal LM: eval mode, every parameter requires_grad False),
            None before the first push.
        version: the version given to the last push (optimiser steps taken), None before the first push.
    """

    needed = True

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        if not dtype.is_floating_point:
            raise ValueError(f"SnapshotSync dtype must be a floating dtype, not {dtype}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.model: torch.nn.Module | None = None
        self.version: int | None = None
        self._lock = threading.Lock()

    def push(self, model: Any, version: int) -> None:
        """Copy `model`'s current weights into the snapshot and record `version`.

        `model` is the (unwrapped) training module: a peft LoRA model (its merged weights W + ΔW are copied; the
        peft model is not merged) or a plain causal LM. Nothing of `model` is modified: weights, requires_grad,
        training flag and adapter state stay as they were. The first push builds the snapshot module from the
        policy's base config (`AutoModelForCausalLM.from_config`, under a forked CPU RNG so torch's global RNG is
        untouched); later pushes copy into the same tensors (no new module, cast to `dtype` in the copy). Tied
        embeddings stay tied. Run it on the main thread; it waits for an in-flight `generate` to finish.

        Raises:
            RuntimeError: the weights do not fit the snapshot module (missing or unexpected names, shape mismatch,
                e.g. a policy whose architecture changed between pushes).
        """
        weights = merged_state_dict(model)
        with self._lock, torch.no_grad():
            if self.model is None:
                self.model = self._build(model)
            _check_ties(self.model, weights)
            result = self.model.load_state_dict(weights, strict=False)
            _check_loaded(self.model, result)
            self.version = version

    def _build(self, policy: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        config = copy.deepcopy(base.config)
        config.use_cache = True
        device = self.device
        if device is None:
            device = next(base.parameters()).device
        with torch.random.fork_rng(devices=[]):  # random init below must not move the trainer's RNG
            snapshot = AutoModelForCausalLM.from_config(config)
        snapshot.to(device=device, dtype=self.dtype)
        snapshot.eval()
        snapshot.requires_grad_(False)
        return snapshot

    @contextmanager
    def snapshot(self) -> Iterator[torch.nn.Module]:
        """The snapshot module, held against `push` for the duration of the `with` block.

        Raises:
            RuntimeError: no push has happened yet (the snapshot does not exist).
        """
        with self._lock:
            if self.model is None:
                raise RuntimeError("SnapshotBackend.generate called before the first SnapshotSync.push: push the "
                                   "policy's weights (weight_sync.push(model, version)) before generating")
            yield self.model


def _check_ties(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError when two pushed tensors would land in one tied snapshot tensor (merged_state_dict keeps
    a tied tensor once, so two names there mean the policy does not tie them while the snapshot does)."""
    state = module.state_dict(keep_vars=True)
    names: dict[int, str] = {}
    for key in weights:
        if key in state:
            other = names.setdefault(state[key].data_ptr(), key)
            if other != key:
                raise RuntimeError(f"SnapshotSync.push: the snapshot ties {other} and {key} but the policy has "
                                   f"separate weights for them (a different architecture than the first push)")


def _check_loaded(module: torch.nn.Module, result: Any) -> None:
    """Raise RuntimeError unless every name the snapshot lacks in the pushed weights is a tied alias of a loaded
    tensor (merged_state_dict keeps shared tensors once) and no pushed name is unknown to the snapshot."""
    if result.unexpected_keys:
        raise RuntimeError(f"SnapshotSync.push: the policy has weights the snapshot does not: "
                           f"{sorted(result.unexpected_keys)[:10]}")
    if not result.missing_keys:
        return
    state = module.state_dict(keep_vars=True)
    missing = set(result.missing_keys)
    loaded = {t.data_ptr() for k, t in state.items() if k not in missing}
    lacking = sorted(k for k in missing if state[k].data_ptr() not in loaded)
    if lacking:
        raise RuntimeError(f"SnapshotSync.push: the policy's weights lack {lacking[:10]} (not tied to a pushed "
                           f"weight in the snapshot; do the policy's and the snapshot's weight tying differ?)")


def completion_seed(seed: int, index: int) -> int:
    """Seed (63 bits) of the private generator of completion `index` of a call seeded with `seed`."""
    return int.from_bytes(hashlib.sha256(f"snapshot/{seed}/{index}".encode()).digest()[:8], "big") >> 1


class SnapshotBackend:
    """Sample from the snapshot kept by a `SnapshotSync`; safe to call from a background thread.

    Args:
        sync: the SnapshotSync whose snapshot is sampled from (push before the first `generate`).
        pad_token_id: id used for left padding (never attended to; any id works).
        eos_token_ids: ids that end a completion (see `reinforge.rollout.factory.eos_token_ids`).
        max_batch: sequences (prompt × completion pairs) decoded together in one forward (a memory bound; the
            result does not depend on it).
    """

    thread_safe = True
    name = "in-process snapshot"

    def __init__(self, sync: SnapshotSync, pad_token_id: int, eos_token_ids: list[int], max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not eos_token_ids:
            raise ValueError("SnapshotBackend needs at least one EOS token id")
        self.sync = sync
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.max_batch = max_batch

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None = None) -> Completions:
        """Sample `params.n` completions per prompt from the snapshot, prompt-major (N = len(prompt_ids) × n).

        Args:
            prompt_ids: P non-empty lists of token ids (no padding).
            params: sampling settings: temperature (> 0), top_k (None/0: off; 1: greedy), top_p, min_p and
                repetition_penalty (applied to prompt and completion tokens, never to padding) are applied with
                transformers' logits processors in `generate`'s order; `extra` must be empty.
            seed: completion i samples with a private `torch.Generator` seeded by `completion_seed(seed, i)`, so
                the same seed, prompts and snapshot give the same completions whatever `max_batch` or thread;
                None: a fresh random seed. torch's global RNG is neither used nor changed.

        Returns:
            Completions with N completion_ids (each up to and including its first EOS, at most
            `params.max_new_tokens` tokens), truncated (True: no EOS within the limit) and logprobs: per token,
            the log-prob of the sampled token under the processed distribution it was drawn from (log-softmax of
            the float32 logits after penalty/temperature/top-k/top-p/min-p; natural log).

        The producer thread may call this while the main thread trains: it reads only the snapshot, which a
        `SnapshotSync.push` replaces only when no generation is in flight (a push waits for this call to end).

        Raises:
            RuntimeError: called before the first `SnapshotSync.push`.
            ValueError: an empty prompt, temperature <= 0, max_new_tokens < 1, n < 1, or `params.extra` set.
        """
        _validate(prompt_ids, params)
        if seed is None:
            seed = secrets.randbits(63)
        expanded = [p for p in prompt_ids for _ in range(params.n)]
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logprobs: list[list[float]] = []
        with self.sync.snapshot() as model, torch.inference_mode():
            for start in range(0, len(expanded), self.max_batch):
                indices = range(start, min(start + self.max_batch, len(expanded)))
                ids, lps, trunc = self._generate_batch(model, [expanded[i] for i in indices], params,
                                                       [completion_seed(seed, i) for i in indices])
                completions += ids
                logprobs += lps
                truncated += trunc
        return Completions(completion_ids=completions, truncated=truncated, logprobs=logprobs)

    def _generate_batch(self, model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """One left-padded batch: prefill, then one token per step for the rows still running."""
        device = next(model.parameters()).device
        rows, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        eos = torch.tensor(self.eos_token_ids, device=device)
        warpers = _warpers(params)

        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        forward = _forward_fn(model)
        logits = forward(input_ids, attention, positions, cache, prefill=True)
        # prompt + completion so far, for the repetition penalty; padding replaced by the row's first prompt token
        # (penalised anyway), so pad ids are never penalised
        first = input_ids.gather(1, (attention == 0).sum(1, keepdim=True))
        sequences = torch.where(attention.bool(), input_ids, first)
        active = torch.arange(rows, device=device)  # batch row → completion index within this batch
        out_ids: list[list[int]] = [[] for _ in range(rows)]
        out_lps: list[list[float]] = [[] for _ in range(rows)]
        finished_at_eos = [False] * rows
        for step in range(params.max_new_tokens):
            scores = logits.float()
            for warper in warpers:
                scores = warper(sequences, scores)
            logp = torch.log_softmax(scores, dim=-1)
            # inverse-CDF sampling with one uniform per completion from its private generator: the draw does not
            # depend on which rows share the batch (first token whose cumulative probability exceeds u·total)
            cdf = logp.exp().double().cumsum(-1)
            u = torch.cat([torch.rand(1, generator=g, device=device, dtype=torch.float64) for g in generators])
            tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            tokens = tokens.clamp(max=cdf.shape[1] - 1)
            token_lp = logp.gather(1, tokens[:, None]).squeeze(1)
            done = torch.isin(tokens, eos)
            for c, t, lp, d in zip(active.tolist(), tokens.tolist(), token_lp.tolist(), done.tolist()):
                out_ids[c].append(t)
                out_lps[c].append(lp)
                finished_at_eos[c] = d
            if step == params.max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):  # finished rows leave the batch (and the KV cache)
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, tokens, attention = active[keep], tokens[keep], attention[keep]
                positions, sequences = positions[keep], sequences[keep]
                generators = [generators[r] for r in keep.tolist()]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            positions = positions[:, -1:] + 1
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            logits = forward(tokens[:, None], attention, positions, cache, prefill=False)
        return out_ids, out_lps, [not f for f in finished_at_eos]


def _validate(prompt_ids: list[list[int]], params: SamplingParams) -> None:
    if params.extra:
        raise ValueError(f"SnapshotBackend does not take generation kwargs (trl.generation_kwargs): "
                         f"{sorted(params.extra)}; use the in-process or vLLM backend for them")
    if not params.temperature > 0:
        raise ValueError(f"SnapshotBackend needs temperature > 0 (got {params.temperature}); for greedy "
                         f"decoding use top_k = 1")
    if params.max_new_tokens < 1 or params.n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1 (got {params.max_new_tokens}, {params.n})")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; SnapshotBackend needs at least one prompt token")


def _warpers(params: SamplingParams) -> list:
    """transformers' logits processors for `params`, in `generate`'s order: repetition penalty, temperature,
    top-k, top-p, min-p (each only when it changes anything)."""
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    warpers: list = []
    if params.repetition_penalty != 1.0:
        warpers.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k:
        warpers.append(TopKLogitsWarper(top_k=int(params.top_k)))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(params.top_p)))
    if params.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=float(params.min_p)))
    return warpers


def _forward_fn(model: torch.nn.Module):
    """model(...) → float logits [rows, vocab] of each row's last position, under the forward's own keyword
    names (transformers 5 calls the KV cache `cache`, 4.x `past_key_values`)."""
    names = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in names else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in names else {}

    def forward(ids, attention, positions, cache, prefill: bool) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    **{cache_kw: cache}, **(last_only if prefill else {}))
        return out.logits[:, -1, :]

    return forward
