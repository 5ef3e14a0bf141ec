"""User rollout functions (`trl.rollout_func: module.fn`) in the three forms users bring, told apart by signature.

| form | signature | gets | returns |
|---|---|---|---|
| reinforge | `fn(prompts, prompt_ids, generator, tokenizer, params)` | P prompts, their token ids, the generation backend, the tokenizer, `SamplingParams` (n = G) | `reinforge.rollout.Completions` with P × G completions |
| TRL 1.16 | `fn(prompts, trainer)` | N = P × G prompts (each repeated G times) and a `TrainerView` | dict with `prompt_ids`, `completion_ids`, `logprobs` (N lists each; logprobs may be None), optional `env_mask` (0: tokens out of the loss); other keys are handed to the reward functions |
| Axolotl | `fn(model, processing_class, prompts, generation_config=None)` | the policy module, the tokenizer, N prompt dicts (the row plus `messages`), a transformers `GenerationConfig` | N completion strings |

A function that fits none of them is an error that lists the three. Forms that receive the policy module (TRL's
`trainer.model`, Axolotl's `model`) run on the main thread; the reinforge form is as thread-safe as the backend.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

from reinforge.rollout.types import Completions, SamplingParams
from reinforge.user_code import UserCodeError

FORMS = ("reinforge: fn(prompts, prompt_ids, generator, tokenizer, params) -> reinforge.rollout.Completions",
         "TRL 1.16: fn(prompts, trainer) -> dict(prompt_ids=, completion_ids=, logprobs=[, env_mask=, ...extra])",
         "Axolotl: fn(model, processing_class, prompts, generation_config=None) -> list of completion strings")


class RolloutFunctionError(UserCodeError):
    """The user's rollout function raised (`what`: `rollout function m.fn raised ValueError('boom')`; `detail`:
    the traceback). A generation-server failure inside it stays a VLLMError."""


@dataclass
class TrainerView:
    """What a TRL-form rollout function sees as `trainer`: `processing_class` (the tokenizer), `model` (the policy
    module), `args` (num_generations, max_completion_length, temperature, top_p, top_k, min_p,
    repetition_penalty, generation_kwargs), and reinforge's `generator` backend with `generate(prompt_ids, params)`."""

    processing_class: Any
    model: Any
    args: Any
    generator: Any


class SeededBackend:
    """A backend whose `generate(prompt_ids, params)` uses the rollout's seed unless given another, so a
    rollout function that samples through it regenerates the same completions on resume."""

    def __init__(self, backend, seed: int | None):
        self.backend, self.seed = backend, seed
        self.thread_safe = getattr(backend, "thread_safe", False)
        self.name = getattr(backend, "name", "none")

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None = None) -> Completions:
        return self.backend.generate(prompt_ids, params, self.seed if seed is None else seed)


class RolloutFunction:
    """A user's rollout function wrapped to return `Completions` for N = P × G completions.

    Args:
        fn: the callable; name: its `module.fn` string (for messages).
    Raises:
        TypeError: the signature fits none of FORMS (the message lists them).
    """

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.form = signature_form(fn, name)
        self.thread_safe = self.form == "reinforge"

    def __call__(self, rows: list[dict[str, Any]], prompt_ids: list[list[int]], *, backend, tokenizer,
                 params: SamplingParams, model: Any, eos_token_id: int, seed: int | None = None) -> Completions:
        G, P = params.n, len(rows)
        backend = SeededBackend(backend, seed)
        prompts = [r["prompt"] for r in rows]
        source = f"rollout_func {self.name}"
        if self.form == "reinforge":
            out = self._call(prompts=prompts, prompt_ids=prompt_ids, generator=backend, tokenizer=tokenizer, params=params)
            if not isinstance(out, Completions):
                raise TypeError(f"{source} (reinforge form) must return reinforge.rollout.Completions, got "
                                f"{type(out).__name__}")
            return out.check(P * G, source)
        if self.form == "trl":
            args = SimpleNamespace(num_generations=G, max_completion_length=params.max_new_tokens,
                                   temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                   min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                   generation_kwargs=dict(params.extra))
            out = self._call([p for p in prompts for _ in range(G)], TrainerView(tokenizer, model, args, backend))
            return _from_trl(out, P * G, eos_token_id, source)
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                  top_k=params.top_k or 0, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                  max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos_token_id)
        dicts = [{**r, "messages": r["prompt"]} if isinstance(r["prompt"], list) else dict(r) for r in rows for _ in range(G)]
        texts = self._call(model=model, processing_class=tokenizer, prompts=dicts, generation_config=config)
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{source} (Axolotl form) must return a list of completion strings")
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_token_id] for t in texts]
        return Completions(completion_ids=ids, truncated=[False] * len(ids)).check(P * G, source)

    def _call(self, *args, **kwargs):
        """The user's function; an exception it raises becomes RolloutFunctionError (a VLLMError stays one)."""
        from reinforge.rollout.vllm import VLLMError

        try:
            return self.fn(*args, **kwargs)
        except VLLMError:
            raise
        except Exception as exc:  # the user's code: one line names it, --debug shows the traceback
            raise RolloutFunctionError("rollout function", self.name, exc) from exc


def signature_form(fn: Callable, name: str) -> str:
    """"reinforge", "trl" or "axolotl" from `fn`'s parameter names. Raises TypeError listing FORMS."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise TypeError(f"rollout_func {name}: cannot read its signature; accepted forms:\n  " + "\n  ".join(FORMS)) from None
    names = set(params)
    if {"prompts", "prompt_ids", "generator", "tokenizer", "params"} <= names:
        return "reinforge"
    if "trainer" in names and "prompts" in names:
        return "trl"
    if {"model", "processing_class", "prompts"} <= names:
        return "axolotl"
    raise TypeError(f"rollout_func {name} has parameters ({', '.join(params)}), which fit none of the accepted "
                    f"forms:\n  " + "\n  ".join(FORMS))


def _from_trl(out: Any, n: int, eos_token_id: int, source: str) -> Completions:
    if not isinstance(out, dict):
        raise TypeError(f"{source} (TRL form) must return a dict, got {type(out).__name__}")
    missing = sorted({"prompt_ids", "completion_ids", "logprobs"} - out.keys())
    if missing:
        raise ValueError(f"{source} (TRL form) must return keys {missing} in its output dict")
    completion_ids = [list(c) for c in out["completion_ids"]]
    logprobs = out["logprobs"]
    env_mask = out.get("env_mask")
    extra = {k: v for k, v in out.items() if k not in ("prompt_ids", "completion_ids", "logprobs", "env_mask")}
    extra = {k: (v if isinstance(v, list) else [v] * n) for k, v in extra.items()}
    return Completions(completion_ids=completion_ids, truncated=[not c or c[-1] != eos_token_id for c in completion_ids],
                       logprobs=None if logprobs is None else [[float(x) for x in lp] for lp in logprobs],
                       prompt_ids=[list(p) for p in out["prompt_ids"]],
                       loss_mask=None if env_mask is None else [[int(m) for m in row] for row in env_mask],
                       extra=extra).check(n, source)


def load_rollout_function(spec: str | None) -> RolloutFunction | None:
    """`trl.rollout_func` (`module.fn`, imported from the working directory first) wrapped, or None.
    Raises ImportError (cannot import) or TypeError (no accepted form)."""
    if not spec:
        return None
    from reinforge.rollout.factory import import_object

    return RolloutFunction(import_object(spec), spec)
