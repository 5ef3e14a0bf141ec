"""Multi-turn rollouts from a NeMo Gym agent (`nemo_gym_multi_turn: true`).

Each of the G episodes of a row is one `POST <agent>/run` with the row (its `responses_create_params`, plus
`max_output_tokens` = trl.max_completion_length per model call and the sampling temperature/top_p). The agent calls
the policy through NeMo Gym's model proxy (`responses_api_models/vllm_model` with `return_token_id_information`),
which forwards to reinforge's vLLM server, runs the tools against the resource server and verifies the episode.

The answer's output items carry, per model call, `prompt_token_ids`, `generation_token_ids` and
`generation_log_probs`. One episode becomes one sequence: the first call's prompt is the prompt; the completion is
every call's generated tokens (in the loss, with the sampler's log-probs) and, between them, the tokens the next
call's prompt adds — tool results and the chat template's turn markers (in the sequence, out of the loss:
`loss_mask` 0, no sampler log-prob). The episode reward is the answer's `reward` (column `nemo_gym_reward`, read by
`reward_env`).

A failed episode (timeout after nemo_gym_run_timeout, non-200, an answer without reward or token ids, or
`mask_sample`) is a masked sample: NaN reward, loss mask 0 (a failed /run has no tokens: one EOS token stands in).
An episode whose later prompt does not extend the sequence so far (the server re-rendered earlier turns
differently) cannot be one sequence: it is masked too and counted in `nemo_gym/non_contiguous_episodes`.
With a rollout seed every episode's model calls are seeded (`seeded`), so a resumed run asks for the same
episodes; vLLM reproduces them only with the same weights, batch composition and build (see rollout.vllm).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from reinforge.nemo_gym.responses import OWN_COLUMNS
from reinforge.nemo_gym.servers import NemoGymError
from reinforge.nemo_gym.source import Answer, NemoGymSession, answer_metrics, post_json
from reinforge.rollout.types import Completions, SamplingParams
from reinforge.rollout.vllm import completion_seed

NAN = float("nan")


@dataclass
class Episode:
    """One episode as a sequence: prompt ids, completion ids, loss mask, sampler log-probs, truncated, turns."""

    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    truncated: bool
    turns: int


def model_calls(output: list[dict[str, Any]]) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt ids, generated ids, log-probs) of each model call in a /run answer's output items, in order (items of
    one call that repeat its token information are counted once)."""
    calls: list[tuple[list[int], list[int], list[float]]] = []
    for item in output:
        gen = item.get("generation_token_ids") if isinstance(item, dict) else None
        if not gen:
            continue
        call = (list(item.get("prompt_token_ids") or []), list(gen),
                [NAN if v is None else float(v) for v in (item.get("generation_log_probs") or [NAN] * len(gen))])
        if calls and calls[-1][0] == call[0] and calls[-1][1] == call[1]:
            continue
        calls.append(call)
    return calls


def episode(answer: dict[str, Any]) -> Episode | None:
    """The sequence of a /run answer (see the module docstring); None when its calls do not chain."""
    response = answer.get("response") or {}
    calls = model_calls(response.get("output") or [])
    if not calls:
        raise ValueError("the /run answer has no generation_token_ids: configure the model server with "
                         "return_token_id_information: true")
    prompt = calls[0][0]
    seq, mask, lps = list(prompt), [], []
    for i, (p, gen, lp) in enumerate(calls):
        if i:
            if p[:len(seq)] != seq:
                return None
            added = p[len(seq):]
            seq += added
            mask += [0] * len(added)
            lps += [NAN] * len(added)
        seq += gen
        mask += [1] * len(gen)
        lps += lp[:len(gen)] + [NAN] * (len(gen) - len(lp))
    return Episode(prompt, seq[len(prompt):], mask, lps, bool(response.get("incomplete_details")), len(calls))


def seeded(body: dict[str, Any], seed: int | None, index: int) -> dict[str, Any]:
    """The /run body of episode `index` of a rollout sampled with `seed`: its model calls carry the vLLM sampling
    seed `completion_seed(seed, index)`, passed the way NeMo Gym's vllm_model proxy forwards extra request fields
    (`responses_create_params.metadata.extra_body`, a JSON text merged into each chat-completions request; the
    row's own extra_body keys are kept). Without a seed the body is returned as it is."""
    if seed is None:
        return body
    params = dict(body["responses_create_params"])
    metadata = dict(params.get("metadata") or {})
    extra = json.loads(metadata.get("extra_body") or "{}")
    metadata["extra_body"] = json.dumps({**extra, "seed": completion_seed(seed, index)})
    params["metadata"] = metadata
    return {**body, "responses_create_params": params}


class MultiTurnSource:
    """The producer's rollout source for multi-turn NeMo Gym: G agent episodes per row (module docstring).
    Called like a rollout function; returns Completions with per-episode prompt ids."""

    thread_safe = True
    name = "nemo_gym.run"

    def __init__(self, session: NemoGymSession):
        self.session = session
        self._http = httpx.Client(limits=httpx.Limits(max_connections=session.max_concurrency))

    def close(self) -> None:
        self._http.close()

    def agent_url(self, row: dict[str, Any]) -> str:
        name = self.session.router.server(row, "responses_api_agents")
        agents = self.session.servers.of_kind("responses_api_agents")
        return f"{self.session.servers.agent(name if name in agents else None).url}/run"

    def __call__(self, rows: list[dict[str, Any]], prompt_ids: list[list[int]], *, backend=None, tokenizer=None,
                 params: SamplingParams, model: Any = None, eos_token_id: int | None = None,
                 seed: int | None = None) -> Completions:
        G = params.n
        urls = [self.agent_url(r) for r in rows]
        bodies = []
        for r in rows:
            if not isinstance(r.get("responses_create_params"), dict):
                raise NemoGymError("a multi-turn row has no `responses_create_params` mapping (the agent's request)")
            body = {k: v for k, v in r.items() if k not in OWN_COLUMNS and not k.startswith("_")}
            body["responses_create_params"] = {**r["responses_create_params"], "max_output_tokens": params.max_new_tokens,
                                               "temperature": params.temperature, "top_p": params.top_p}
            bodies.append(body)
        t0 = time.perf_counter()

        def one(i: int) -> Answer:
            return post_json(self._http, urls[i // G], seeded(bodies[i // G], seed, i), self.session.run_timeout)

        with ThreadPoolExecutor(max_workers=max(1, min(self.session.max_concurrency, len(rows) * G))) as pool:
            answers = list(pool.map(one, range(len(rows) * G)))
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
        out_prompts, ids, masks, lps, truncated, turns, broken = [], [], [], [], [], [], 0
        for i, a in enumerate(answers):
            ep = None
            if a.error is None:
                try:
                    ep = episode(a.body or {})
                except ValueError as exc:
                    a.error, a.masked, a.reward = f"{urls[i // G]}: {exc}", True, math.nan
                if ep is None and a.error is None:
                    broken += 1
                    a.masked, a.reward = True, math.nan
            if ep is None or not ep.completion_ids:
                out_prompts.append(ep.prompt_ids if ep is not None else list(prompt_ids[i // G]))
                ids.append([eos]), masks.append([0]), lps.append([NAN]), truncated.append(False)
                a.masked, a.reward = True, math.nan
                continue
            out_prompts.append(ep.prompt_ids)
            ids.append(ep.completion_ids)
            masks.append([0] * len(ep.loss_mask) if a.masked else ep.loss_mask)
            lps.append(ep.logprobs)
            truncated.append(ep.truncated)
            turns.append(ep.turns)
        metrics = answer_metrics(answers, "run")
        metrics["nemo_gym/non_contiguous_episodes"] = float(broken)
        metrics["nemo_gym/turns_mean"] = sum(turns) / len(turns) if turns else 0.0
        metrics["time/nemo_gym_run"] = time.perf_counter() - t0
        return Completions(completion_ids=ids, truncated=truncated, logprobs=lps, prompt_ids=out_prompts,
                           loss_mask=masks, extra={"nemo_gym_reward": [a.reward for a in answers]},
                           metrics=metrics).check(len(rows) * G, self.name)
