"""From the config to the rollout layer's parts: generation backend, weight sync, producer, preparer."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.rollout.feature_rewards import ground_truth_ids
from reinforge.rollout.inprocess import InProcessBackend
from reinforge.rollout.prepare import RolloutPreparer, SamplerCorrectionSpec
from reinforge.rollout.producer import RolloutProducer
from reinforge.rollout.snapshot import SnapshotBackend, SnapshotSync
from reinforge.rollout.sync import FullWeightSync, LoraFileSync, SharedWeights
from reinforge.rollout.types import SamplingParams

log = logging.getLogger(__name__)


def import_object(spec: str) -> Callable:
    """`module.fn` → the object, importing from the working directory first. Raises ImportError naming `spec`."""
    module_name, _, attr = spec.rpartition(".")
    if not module_name:
        raise ImportError(f"{spec!r} is not of the form module.fn")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    if not hasattr(module, attr):
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
    return getattr(module, attr)


def eos_token_ids(policy, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any extra EOS ids of the model's generation config."""
    eos = [tokenizer.eos_token_id]
    extra = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    for e in extra if isinstance(extra, list) else [extra]:
        if e is not None and e not in eos:
            eos.append(e)
    return eos


def sampling_params(cfg: ReinforgeConfig) -> SamplingParams:
    """The `trl:` sampling keys as SamplingParams (n = num_generations)."""
    t = cfg.trl
    return SamplingParams(n=t.num_generations, max_new_tokens=t.max_completion_length, temperature=t.temperature,
                          top_p=t.top_p, top_k=t.top_k, min_p=t.min_p, repetition_penalty=t.repetition_penalty,
                          extra=t.generation_kwargs or {})


class BackendResources(ExitStack):
    """What the generation backend holds for a run, closed when the run ends however it ends: connections, the
    temporary sync directory, and NeMo Gym's servers (`nemo_gym`, a `NemoGymSession`, or None)."""

    nemo_gym = None


def build_backend(cfg: ReinforgeConfig, policy, tokenizer, out_dir: Path, is_main: bool = True):
    """(backend, weight sync, resources) for the config: in-process generation on the policy or on a snapshot copy
    of its weights (`trl.inprocess_sampler`), or a vLLM server
    (waited for up to `trl.vllm_server_timeout`; VLLMError naming the URL when it never answers). `resources` is
    a context manager (`BackendResources`) that closes the connections, removes a temporary sync directory and
    stops the NeMo Gym servers it started (`nemo_gym_enabled`: started or reused here, before the backend). With
    several processes every process talks to the server (each sends its own prompts); only the main process syncs."""
    resources = BackendResources()
    try:
        if cfg.nemo_gym_enabled:
            resources.nemo_gym = _start_nemo_gym(cfg, out_dir, is_main, resources)
        return _build_backend(cfg, policy, tokenizer, out_dir, is_main, resources)
    except BaseException:
        resources.close()
        raise


def _start_nemo_gym(cfg: ReinforgeConfig, out_dir: Path, is_main: bool, resources: ExitStack):
    """NeMo Gym's servers (started by the main process when nemo_gym_auto_start, else reused) as a session whose
    servers stop when `resources` closes. Raises NemoGymError (a RunError)."""
    from reinforge.nemo_gym.servers import NemoGymServers, check_gym_dir
    from reinforge.nemo_gym.source import NemoGymSession

    check_gym_dir(cfg.nemo_gym_path, cfg.nemo_gym_auto_clone)
    servers = NemoGymServers(cfg.nemo_gym_path, cfg.nemo_gym_config_paths, host=cfg.nemo_gym_host,
                             head_port=cfg.nemo_gym_head_port, timeout=cfg.nemo_gym_server_timeout,
                             auto_start=cfg.nemo_gym_auto_start and is_main, venv=cfg.nemo_gym_venv,
                             log_path=out_dir / "nemo_gym.log", wait_for_head=not is_main,
                             max_turns=cfg.nemo_gym_max_turns)
    resources.enter_context(servers)
    return NemoGymSession(cfg, servers)


def _build_backend(cfg: ReinforgeConfig, policy, tokenizer, out_dir: Path, is_main: bool, resources: ExitStack):
    t = cfg.trl
    if not t.use_vllm:
        eos = eos_token_ids(policy, tokenizer)
        if t.snapshot_sampler:
            sync = SnapshotSync(dtype=getattr(torch, t.inprocess_sampler_dtype))
            return SnapshotBackend(sync, tokenizer.pad_token_id, eos), sync, resources
        return InProcessBackend(policy, tokenizer.pad_token_id, eos), SharedWeights(), resources
    from reinforge.rollout.vllm import VLLMClient, VLLMServerBackend

    client = VLLMClient(t.server_url, timeout=t.vllm_server_timeout, api_key=cfg.vllm.api_key)
    resources.callback(client.close)
    model_id = client.wait_until_ready()
    log.info("vLLM server at %s serves %s", client.base_url, model_id)
    # NeMo Gym multi-turn: the agent's model proxy asks for one name, so every adapter version is served under it
    lora_name = cfg.nemo_gym_policy_name if cfg.nemo_gym_enabled and cfg.nemo_gym_multi_turn else None
    if resources.nemo_gym is not None and cfg.nemo_gym_multi_turn:
        resources.nemo_gym.check_model_proxies(cfg.nemo_gym_policy_name, client.base_url)
    if not is_main:
        return VLLMServerBackend(client), _FollowerSync(client, cfg.lora_sync, lora_name), resources
    directory = Path(t.vllm_sync_dir) if t.vllm_sync_dir else _temporary_sync_dir(out_dir, resources)
    if cfg.lora_sync:
        sync = LoraFileSync(client, directory, name=lora_name)
    else:
        sync = FullWeightSync(client, directory, dtype=SERVER_DTYPES.get(cfg.vllm.dtype))
    return VLLMServerBackend(client), sync, resources


# `vllm.dtype` values whose weights are sent already cast (auto and float32: as trained)
SERVER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}


class _FollowerSync:
    """A non-main process of a multi-process run: the main process moves the weights; this one only samples
    from the version the main process loaded (same adapter name)."""

    needed = True

    def __init__(self, client, lora: bool, lora_name: str | None = None):
        self.client, self.lora, self.lora_name = client, lora, lora_name

    def push(self, model: Any, version: int) -> None:
        self.client.model = (self.lora_name or f"reinforge-v{version}") if self.lora else self.client.base_model


def _temporary_sync_dir(out_dir: Path, resources: ExitStack) -> Path:
    """A directory in /dev/shm (RAM) when writable, else output_dir/vllm_sync; the /dev/shm one is removed
    when `resources` closes."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="reinforge-sync-", dir=shm))
        resources.callback(shutil.rmtree, path, True)
        return path
    return out_dir / "vllm_sync"


def build_producer(cfg: ReinforgeConfig, policy, tokenizer, backend, funcs, pool,
                   max_new_tokens_fn: Callable | None = None,
                   resources: BackendResources | None = None) -> RolloutProducer:
    """The RolloutProducer of the config: backend (or the user's rollout_func, or NeMo Gym's rollout source when
    `resources` holds a NeMo Gym session), reward scoring (none without reward functions: EBFT scores on the main
    thread), the optional per-rollout completion-length cap."""
    from reinforge.rewards import score
    from reinforge.rollout.functions import load_rollout_function

    t = cfg.trl
    rollout_fn = load_rollout_function(t.rollout_func)
    if cfg.nemo_gym_enabled:
        session = getattr(resources, "nemo_gym", None)
        if session is None:
            raise ValueError("nemo_gym_enabled: build_producer needs the resources of build_backend (its NeMo Gym "
                             "session)")
        rollout_fn = _nemo_gym_source(cfg, session, resources)
    producer = RolloutProducer(
        tokenizer, backend, [f.name for f in funcs], sampling_params(cfg),
        (lambda p, c, ids, cols: score(funcs, p, c, cols, timeout=t.reward_timeout, completion_ids=ids, pool=pool))
        if funcs else (lambda p, c, ids, cols: torch.zeros(len(c), 0)),
        chat_kwargs=t.chat_template_kwargs, max_prompt_length=t.max_prompt_length,
        rollout_fn=rollout_fn, model=policy, eos_token_id=tokenizer.eos_token_id,
        stream_groups=t.streaming_min_groups if t.streaming_partial_batch else None, max_new_tokens_fn=max_new_tokens_fn,
        continue_turns=method(cfg.rl).rewards == "feature_matching")
    if t.streaming_partial_batch and not producer.streams:
        log.warning("streaming_partial_batch has no effect here: the %s %s finishes all groups of a rollout together "
                    "(groups stream from a vLLM server)", backend.name,
                    "rollout function" if t.rollout_func else "backend")
    return producer


def _nemo_gym_source(cfg: ReinforgeConfig, session, resources: ExitStack):
    """NeMo Gym's rollout source (single-turn /verify or multi-turn agent /run), closed with `resources`."""
    t = cfg.trl
    if cfg.nemo_gym_multi_turn:
        from reinforge.nemo_gym.multi_turn import MultiTurnSource

        source = MultiTurnSource(session)
    else:
        from reinforge.nemo_gym.source import SingleTurnSource

        source = SingleTurnSource(session, chat_kwargs=t.chat_template_kwargs, max_prompt_length=t.max_prompt_length)
    resources.callback(source.close)
    return source


def build_preparer(cfg: ReinforgeConfig, tokenizer, n_funcs: int, old_from_training: bool = False) -> RolloutPreparer:
    """The RolloutPreparer of the config (sampler correction on with a vLLM or snapshot sampler unless switched
    off; EBFT's ground-truth rows for the cross-entropy when `ebft.ce_coef` > 0)."""
    t = cfg.trl
    reference_ids = partial(ground_truth_ids, tokenizer) if cfg.ebft.ce_coef else None
    correction = None
    if (t.use_vllm or t.snapshot_sampler) and t.vllm_importance_sampling_correction:
        correction = SamplerCorrectionSpec(t.vllm_importance_sampling_mode, t.importance_sampling_cap,
                                           t.vllm_importance_sampling_clip_min)
    return RolloutPreparer(tokenizer.pad_token_id, t.reward_weights or [1.0] * n_funcs, scale_rewards=t.scale_rewards,
                           aggregation=t.multi_objective_aggregation, mask_truncated=t.mask_truncated_completions,
                           correction=correction, old_from_training=old_from_training, reference_ids=reference_ids)
