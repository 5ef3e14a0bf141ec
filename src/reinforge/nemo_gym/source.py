"""NeMo Gym as the rollout source of a GRPO run (it takes the place of `trl.rollout_func` in the producer).

Single-turn: the generation backend samples G completions per row; each is sent to the row's resource server
`/verify` as a Responses object (`reinforge.nemo_gym.responses`); the answer's `reward` becomes the column
`nemo_gym_reward` that `reward_nemo_gym_verify` returns. Multi-turn (`reinforge.nemo_gym.multi_turn`): the row goes
to an agent's `/run`, which samples from the vLLM server itself.

A sample is masked — NaN reward (so it is left out of its group's statistics, advantage 0) and every token out of
the loss (`loss_mask` 0) — when NeMo Gym says so (`mask_sample: true`), or when it could not score it: a timeout,
a non-200 answer, an answer without a numeric `reward`. Those failures are counted per rollout
(`nemo_gym/verify_errors`) and logged as a warning with the first error; answers carrying a `failure_kind` are
counted per kind (`nemo_gym/failure/<kind>`). Only HTTP happens here, so the source is thread-safe (async prefetch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from reinforge.nemo_gym.responses import chat_tools, verify_body
from reinforge.nemo_gym.servers import NemoGymError, NemoGymServers, is_loopback
from reinforge.rollout.types import Completions, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """NeMo Gym's answer for one sample: reward (NaN when there is none), masked, failure_kind, and error (why
    there is no usable answer: timeout, HTTP status, malformed body; None when the server answered)."""

    reward: float
    masked: bool = False
    failure_kind: str | None = None
    error: str | None = None
    body: dict[str, Any] | None = field(default=None, repr=False)


def post_json(http: httpx.Client, url: str, body: dict[str, Any], timeout: float) -> Answer:
    """POST `body` to `url`; the answer's reward/mask_sample/failure_kind, or an Answer with `error` set (NaN
    reward, masked) for a timeout, a connection failure, a non-200 status or a body without a numeric reward."""
    try:
        r = http.post(url, json=body, timeout=timeout)
    except httpx.TimeoutException:
        return Answer(math.nan, True, error=f"timeout: no answer from {url} within {timeout:g} s")
    except httpx.HTTPError as exc:
        return Answer(math.nan, True, error=f"{type(exc).__name__} from {url}: {exc}")
    if r.status_code != 200:
        return Answer(math.nan, True, error=f"HTTP {r.status_code} from {url}: {r.text[:300]}")
    try:
        data = r.json()
    except ValueError:
        return Answer(math.nan, True, error=f"malformed answer from {url} (not JSON): {r.text[:300]}")
    reward = data.get("reward") if isinstance(data, dict) else None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(float(reward)):
        return Answer(math.nan, True, error=f"malformed answer from {url}: no numeric `reward` in {str(data)[:300]}")
    masked = bool(data.get("mask_sample", False))
    return Answer(math.nan if masked else float(reward), masked, data.get("failure_kind"), body=data)


def answer_metrics(answers: list[Answer], what: str) -> dict[str, float]:
    """Per-rollout counts: nemo_gym/<what>_errors, nemo_gym/masked, nemo_gym/failure/<kind>."""
    errors = [a for a in answers if a.error is not None]
    out = {f"nemo_gym/{what}_errors": float(len(errors)), "nemo_gym/masked": float(sum(a.masked for a in answers))}
    for a in answers:
        if a.failure_kind:
            key = f"nemo_gym/failure/{a.failure_kind}"
            out[key] = out.get(key, 0.0) + 1.0
    if errors:
        log.warning("NeMo Gym: %d of %d %s requests failed (those samples are masked: NaN reward, out of the loss); "
                    "first: %s", len(errors), len(answers), what, errors[0].error)
    return out


def _request_key(params: Any) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


class Router:
    """Which NeMo Gym server a row goes to: its own `agent_ref` when that names a server of the wanted kind, else
    the `server_name` of the nemo_gym_datasets entry the row comes from (recognised by its
    `responses_create_params`; not needed when every entry names the same server).

    Args:
        datasets: the config's nemo_gym_datasets; gym_dir: the directory their paths are relative to.
    """

    def __init__(self, datasets: list[Any], gym_dir: Path):
        self.names = {d.server_name for d in datasets if d.server_name}
        self.by_request: dict[str, str] = {}
        if len(self.names) > 1:
            for d in datasets:
                if not d.server_name:
                    continue
                path = gym_dir / d.path
                try:
                    lines = path.read_text().splitlines()
                except OSError as exc:
                    raise NemoGymError(f"nemo_gym_datasets: cannot read {path}: {exc}") from None
                for line in lines:
                    if line.strip():
                        key = _request_key(json.loads(line).get("responses_create_params"))
                        if self.by_request.setdefault(key, d.server_name) != d.server_name:
                            raise NemoGymError(f"nemo_gym_datasets: the same request is in files of two servers "
                                               f"({self.by_request[key]}, {d.server_name}); give each row an agent_ref")

    def server(self, row: dict[str, Any], kind: str) -> str | None:
        """The server name for `row` (None: not determined; the caller decides)."""
        ref = row.get("agent_ref")
        if isinstance(ref, dict) and ref.get("name") and ref.get("type", kind) == kind:
            return str(ref["name"])
        if len(self.names) == 1:
            return next(iter(self.names))
        return self.by_request.get(_request_key(row.get("responses_create_params")))


class NemoGymSession:
    """The running servers plus what the run's rollout sources need from the config (built by the rollout factory
    inside the backend's resources, so the servers stop with them)."""

    def __init__(self, cfg, servers: NemoGymServers):
        self.servers = servers
        self.router = Router(cfg.nemo_gym_datasets or [], cfg.nemo_gym_path)
        self.model_name = cfg.nemo_gym_model_name or cfg.base_model
        self.verify_timeout, self.run_timeout = cfg.nemo_gym_verify_timeout, cfg.nemo_gym_run_timeout
        self.max_concurrency = cfg.nemo_gym_max_concurrency
        self.multi_turn = cfg.nemo_gym_multi_turn

    def check_model_proxies(self, name: str, vllm_url: str) -> None:
        """Multi-turn: some NeMo Gym model server must forward to the vLLM server at `vllm_url` and ask for the model
        `name` (what reinforge serves the policy under), else the agent samples from another model or gets 404s.
        Raises NemoGymError naming what the model servers forward to and ask for."""
        want = urlparse(vllm_url)
        proxies = self.servers.declared("responses_api_models")
        seen = []
        for proxy, settings in proxies.items():
            base = urlparse(str(settings.get("base_url") or ""))
            same = base.port == want.port and (base.hostname == want.hostname
                                               or (is_loopback(base.hostname or "") and is_loopback(want.hostname or "")))
            seen.append(f"{proxy}: {settings.get('base_url')} model {settings.get('model')!r}")
            if same and settings.get("model") == name:
                return
        raise NemoGymError(f"no NeMo Gym model server forwards to the vLLM server {vllm_url} asking for the model "
                           f"{name!r} (the policy's served name: nemo_gym_model_name, default base_model); the model "
                           f"servers are: {'; '.join(seen) or 'none'}. Set the proxy's `base_url: {vllm_url}/v1` and "
                           f"`model: {name}` in the NeMo Gym config")


class SingleTurnSource:
    """Generate with the backend, then score every completion with its row's resource server `/verify`.

    Called by the producer like a rollout function: `source(rows, prompt_ids, backend=, tokenizer=, params=,
    model=, eos_token_id=, seed=) -> Completions` (N = P × G, prompt-major), with the column `nemo_gym_reward`,
    masked samples' `loss_mask` all 0, and the counts of `answer_metrics` in `metrics`.
    """

    thread_safe = True
    name = "nemo_gym.verify"

    def __init__(self, session: NemoGymSession, chat_kwargs: dict[str, Any] | None = None,
                 max_prompt_length: int | None = None):
        self.session, self.chat_kwargs, self.max_prompt_length = session, chat_kwargs or {}, max_prompt_length
        self._http = httpx.Client(limits=httpx.Limits(max_connections=session.max_concurrency))

    def close(self) -> None:
        self._http.close()

    def verify_url(self, row: dict[str, Any]) -> str:
        name = self.session.router.server(row, "resources_servers")
        if name is None:
            raise NemoGymError("cannot tell which resource server verifies a row: it has no agent_ref and its "
                               "responses_create_params is in none of the nemo_gym_datasets files")
        return f"{self.session.servers.resources_server(name).url}/verify"

    def render(self, row: dict[str, Any], prompt_ids: list[int], tokenizer) -> list[int]:
        """The prompt token ids with the row's tools given to the chat template (the producer's own without tools)."""
        tools = chat_tools(row.get("responses_create_params") or {})
        if tools is None or isinstance(row["prompt"], str):
            return prompt_ids
        text = tokenizer.apply_chat_template(row["prompt"], tools=tools, tokenize=False, add_generation_prompt=True,
                                             **self.chat_kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_length:] if self.max_prompt_length and len(ids) > self.max_prompt_length else ids

    def __call__(self, rows: list[dict[str, Any]], prompt_ids: list[list[int]], *, backend, tokenizer,
                 params: SamplingParams, model: Any = None, eos_token_id: int | None = None,
                 seed: int | None = None) -> Completions:
        G = params.n
        urls = [self.verify_url(r) for r in rows]
        rendered = [self.render(r, p, tokenizer) for r, p in zip(rows, prompt_ids)]
        out = backend.generate(rendered, params, seed).check(len(rows) * G, f"{backend.name} backend")
        texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        t0 = time.perf_counter()
        model_name = self.session.model_name
        tag = f"{os.getpid()}_{seed if seed is not None else 'x'}"

        def one(i: int) -> Answer:
            try:
                body = verify_body(rows[i // G], texts[i], model_name, f"{tag}_{i}")
            except ValueError as exc:
                raise NemoGymError(str(exc)) from None
            return post_json(self._http, urls[i // G], body, self.session.verify_timeout)

        with ThreadPoolExecutor(max_workers=max(1, min(self.session.max_concurrency, len(texts)))) as pool:
            answers = list(pool.map(one, range(len(texts))))
        metrics = answer_metrics(answers, "verify")
        metrics["time/nemo_gym_verify"] = time.perf_counter() - t0
        mask = out.loss_mask or [[1] * len(c) for c in out.completion_ids]
        loss_mask = [[0] * len(m) if a.masked else m for m, a in zip(mask, answers)]
        return Completions(completion_ids=out.completion_ids, truncated=out.truncated, logprobs=out.logprobs,
                           prompt_ids=None if rendered == prompt_ids else [p for p in rendered for _ in range(G)],
                           loss_mask=loss_mask, extra={**out.extra, "nemo_gym_reward": [a.reward for a in answers]},
                           metrics=metrics).check(len(rows) * G, self.name)
