"""The rollout producer: dataset rows → generated, decoded and scored completions (a `Rollout`).

It only generates and scores: no collectives, no change to the training module, no global RNG (sampling
is seeded per rollout through the backend), so with a thread-safe backend (a vLLM server) and a reinforge-form
or no rollout function it can run in a background thread unchanged (`thread_safe`). The cross-process part
(gathering rewards, advantages) and the no-grad forwards happen afterwards on the main thread
(`reinforge.rollout.prepare`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from reinforge.rewards import format_completions
from reinforge.rollout.functions import RolloutFunction
from reinforge.rollout.types import Completions, Rollout, SamplingParams


class RolloutProducer:
    """Builds `Rollout`s; every dependency is passed in explicitly.

    Args:
        tokenizer: renders (chat template) and tokenises prompts, decodes completions.
        backend: generation backend (`generate(prompt_ids, params, seed) -> Completions`, `thread_safe`).
        reward_names: K names; score_fn: (prompts, completions, completion_ids, columns) → [N, K] tensor.
        params: sampling settings (n = num_generations).
        chat_kwargs: extra apply_chat_template arguments; max_prompt_length: keep a prompt's last tokens.
        rollout_fn: a user's RolloutFunction replacing generation (None: the backend).
        model: the policy module, handed only to rollout functions of the forms that take it.
        eos_token_id: the EOS id (for rollout functions returning strings).
        stream_groups: score prompt groups as they finish, this many at a time (`trl.streaming_partial_batch` /
            `streaming_min_groups`), when the backend yields groups (`generate_groups`: the vLLM server); None:
            score the whole rollout at once. Rewards of per-completion reward functions do not change; a reward
            function that looks at the whole batch sees a chunk of it.
        max_new_tokens_fn: rows → the completion-length cap of their rollout (EBFT's adaptive_max_tokens); None:
            `params.max_new_tokens`.
    """

    def __init__(self, tokenizer, backend, reward_names: list[str], params: SamplingParams, score_fn: Callable, *,
                 chat_kwargs: dict[str, Any] | None = None, max_prompt_length: int | None = None,
                 rollout_fn: RolloutFunction | None = None, model: Any = None, eos_token_id: int | None = None,
                 stream_groups: int | None = None, max_new_tokens_fn: Callable[[list[dict[str, Any]]], int] | None = None):
        self.tokenizer, self.backend, self.params = tokenizer, backend, params
        self.stream_groups, self.max_new_tokens_fn = stream_groups, max_new_tokens_fn
        self.reward_names, self.score_fn = reward_names, score_fn
        self.chat_kwargs, self.max_prompt_length = chat_kwargs or {}, max_prompt_length
        self.rollout_fn, self.model = rollout_fn, model
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id

    @property
    def thread_safe(self) -> bool:
        """Whether `produce` may run off the main thread (backend and rollout function both allow it)."""
        return bool(self.backend.thread_safe and (self.rollout_fn is None or self.rollout_fn.thread_safe))

    def prompt_ids(self, prompt: Any) -> list[int]:
        """Render (chat template with generation prompt) and tokenise a prompt; keep its end if too long."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **self.chat_kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_prompt_length and len(ids) > self.max_prompt_length:
            ids = ids[-self.max_prompt_length:]
        return ids

    @property
    def streams(self) -> bool:
        """Whether `produce` scores groups while the others are still generated."""
        return bool(self.stream_groups) and self.rollout_fn is None and hasattr(self.backend, "generate_groups")

    def produce(self, rows: list[dict[str, Any]], seed: int | None, version: int) -> Rollout:
        """Generate G completions for each of the P rows, decode and score them.

        Args:
            rows: P dataset rows ({"prompt", ...extra columns}).
            seed: sampling seed of this rollout (None: unseeded).
            version: optimiser steps of the weights the backend samples from (recorded in the Rollout).
        Raises:
            RewardFunctionError, VLLMError, TypeError/ValueError from a rollout function.
        """
        G = self.params.n
        prompt_ids = [self.prompt_ids(r["prompt"]) for r in rows]
        params = self.params if self.max_new_tokens_fn is None else \
            dataclasses.replace(self.params, max_new_tokens=self.max_new_tokens_fn(rows))
        if self.streams:
            return self._produce_streaming(rows, prompt_ids, params, seed, version)
        t0 = time.perf_counter()
        if self.rollout_fn is None:
            out = self.backend.generate(prompt_ids, params, seed).check(len(rows) * G, f"{self.backend.name} backend")
        else:
            out = self.rollout_fn(rows, prompt_ids, backend=self.backend, tokenizer=self.tokenizer, params=params,
                                  model=self.model, eos_token_id=self.eos_token_id, seed=seed)
        t_gen = time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        t0 = time.perf_counter()
        rewards = self._score(rows, out, texts, params)
        return self._rollout(rows, prompt_ids, out, texts, rewards, version,
                             {"generation": t_gen, "scoring": time.perf_counter() - t0})

    def _score(self, rows: list[dict[str, Any]], out: Completions, texts: list[str], params: SamplingParams):
        """[len(rows) × G, K] rewards of the completions `out` of `rows` (sampled with `params`)."""
        G = self.params.n
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k not in ("prompt", "prompt_ids")}
        columns.update(out.extra)
        columns["completion_truncated"] = list(out.truncated)
        columns["max_completion_length"] = [params.max_new_tokens] * len(texts)
        return self.score_fn(prompts, format_completions(prompts, texts), out.completion_ids, columns)

    def _rollout(self, rows, prompt_ids, out: Completions, texts, rewards, version: int, timings) -> Rollout:
        expanded = out.prompt_ids or [p for p in prompt_ids for _ in range(self.params.n)]
        return Rollout(rows=list(rows), prompt_ids=expanded, completion_ids=out.completion_ids,
                       loss_mask=out.loss_mask or [[1] * len(c) for c in out.completion_ids],
                       sampler_logps=out.logprobs, truncated=list(out.truncated), texts=texts, rewards=rewards,
                       reward_names=list(self.reward_names), policy_version=version, num_generations=self.params.n,
                       timings=timings, metrics=dict(out.metrics))

    def _produce_streaming(self, rows, prompt_ids, params: SamplingParams, seed: int | None, version: int) -> Rollout:
        """`produce` with groups scored `stream_groups` at a time as they finish (see the class docstring).
        Timings: "generation" until the last group arrived, "scoring" the scoring time (mostly overlapped)."""
        G = self.params.n
        groups: dict[int, tuple[Completions, list[str]]] = {}
        rewards: dict[int, Any] = {}
        waiting: list[int] = []
        t0, t_score = time.perf_counter(), 0.0

        def score_waiting() -> None:
            part = [groups[g] for g in waiting]
            out = Completions(completion_ids=[c for o, _ in part for c in o.completion_ids],
                              truncated=[x for o, _ in part for x in o.truncated])
            r = self._score([rows[g] for g in waiting], out, [x for _, texts in part for x in texts], params)
            for j, g in enumerate(waiting):
                rewards[g] = r[j * G:(j + 1) * G]
            waiting.clear()

        for g, out in self.backend.generate_groups(prompt_ids, params, seed):
            groups[g] = (out.check(G, f"{self.backend.name} backend"),
                         self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True))
            waiting.append(g)
            if len(waiting) >= self.stream_groups:
                ts = time.perf_counter()
                score_waiting()
                t_score += time.perf_counter() - ts
        t_gen = time.perf_counter() - t0
        ts = time.perf_counter()
        if waiting:
            score_waiting()
        t_score += time.perf_counter() - ts
        order = range(len(rows))
        parts = [groups[g][0] for g in order]
        out = Completions(completion_ids=[c for o in parts for c in o.completion_ids],
                          truncated=[x for o in parts for x in o.truncated],
                          logprobs=None if any(o.logprobs is None for o in parts) else
                          [x for o in parts for x in o.logprobs])
        texts = [x for g in order for x in groups[g][1]]
        return self._rollout(rows, prompt_ids, out, texts, torch.cat([rewards[g] for g in order]), version,
                             {"generation": t_gen, "scoring": t_score})
