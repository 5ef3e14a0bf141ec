"""Config keys of generation through vLLM: the `vllm:` section (the server `reinforge vllm-serve` starts) and the
trainer's `trl.vllm_*` keys (Axolotl's and TRL 1.16's names). See docs/vllm.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class VLLMServerConfig(_Strict):
    """The `vllm:` section: how `reinforge vllm-serve CONFIG` starts vLLM's OpenAI-compatible server."""

    host: str = Field(default="127.0.0.1", description="Address the server binds (Axolotl's default 0.0.0.0 would expose an unauthenticated server; loopback here).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the server listens on.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one model replica is split over (vLLM --tensor-parallel-size).")
    data_parallel_size: int = Field(default=1, ge=1, description="Model replicas (vLLM --data-parallel-size).")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use (GPU only).")
    dtype: str = Field(default="auto", description="Weights/activations dtype of the server: auto, float32, bfloat16, float16.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length of the server (prompt + completion tokens); default the model's.")
    enable_prefix_caching: bool | None = Field(default=None, description="Reuse KV blocks of shared prompt prefixes (vLLM's default when None).")
    enforce_eager: bool | None = Field(default=None, description="Disable CUDA graphs / compilation (vLLM's default when None).")
    max_lora_rank: int | None = Field(default=None, ge=1, description="Largest LoRA rank the server accepts; default the smallest vLLM rank >= lora_r.")
    kv_cache_space: float = Field(default=2.0, gt=0.0, description="CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads: str | None = Field(default=None, description="CPU only: cores the engine binds, e.g. `0-1` (VLLM_CPU_OMP_THREADS_BIND); default all cores, none reserved for the front end.")
    api_key: str | None = Field(default=None, description="Require this bearer token on every request (vLLM --api-key); the trainer sends it.")
    allow_remote_weight_updates: bool = Field(default=False, description="Allow the weight-update endpoints (runtime LoRA loading, /collective_rpc) on a non-loopback host. Off: a non-loopback server cannot be synced.")
    python: str | None = Field(default=None, description="Python of the vLLM environment; default $REINFORGE_VLLM_PYTHON, else .venv-vllm/bin/python here or in the reinforge checkout.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server arguments, passed as given (e.g. [--max-num-seqs, '64']).")


class VLLMTrainerKeys(_Strict):
    """`trl.use_vllm` and the `trl.vllm_*` keys of the trainer (mixed into the `trl:` section)."""

    use_vllm: bool = Field(default=False, description="Generate through a vLLM server instead of in-process.")
    vllm_mode: Literal["server", "colocate"] = Field(default="server", description="server: a separate vLLM server (`reinforge vllm-serve`); colocate: vLLM inside the training process (not supported).")
    vllm_server_host: str = Field(default="127.0.0.1", description="Host of the vLLM server (ignored with vllm_server_base_url).")
    vllm_server_port: int = Field(default=8000, ge=1, le=65535, description="Port of the vLLM server.")
    vllm_server_base_url: str | None = Field(default=None, description="Full URL of the server, e.g. http://127.0.0.1:8000 (overrides host and port).")
    vllm_server_timeout: float = Field(default=240.0, gt=0.0, description="Seconds to wait for the server at start, and for one request.")
    vllm_lora_sync: bool | None = Field(default=None, description="With adapter: lora, sync the adapter files (runtime LoRA loading) instead of merged full weights. Default: true with an adapter.")
    vllm_sync_interval: int = Field(default=1, ge=1, description="Sync the policy weights to the server every N optimiser steps (before generating).")
    vllm_sync_dir: str | None = Field(default=None, description="Directory for the weight files of a sync (must be readable by the server); default a temporary directory in /dev/shm (else output_dir/vllm_sync).")
    vllm_importance_sampling_correction: bool = Field(default=True, description="Re-weight the policy-gradient term by π_old/μ (trainer over sampler probability) of each token or sequence.")
    vllm_importance_sampling_mode: ISMode = Field(default="token_truncate", description="token_truncate (Axolotl's default), token_mask, sequence_truncate or sequence_mask (TRL 1.16's default).")
    vllm_importance_sampling_cap: float | None = Field(default=3.0, gt=0.0, description="Upper bound C of the importance weight (truncate: clamp; mask: zero above). Axolotl's name.")
    vllm_importance_sampling_clip_max: float | None = Field(default=None, gt=0.0, description="TRL 1.16's name of vllm_importance_sampling_cap (takes precedence).")
    vllm_importance_sampling_clip_min: float | None = Field(default=None, ge=0.0, description="Lower bound of the importance weight (truncate: clamp; mask: zero below); default none.")

    @property
    def importance_sampling_cap(self) -> float | None:
        """The effective upper bound: `vllm_importance_sampling_clip_max`, else `vllm_importance_sampling_cap`."""
        return self.vllm_importance_sampling_clip_max if self.vllm_importance_sampling_clip_max is not None \
            else self.vllm_importance_sampling_cap

    @property
    def server_url(self) -> str:
        """Base URL of the server (no /v1)."""
        return (self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}").rstrip("/")

    @model_validator(mode="after")
    def check_vllm_keys(self) -> "VLLMTrainerKeys":
        lo, hi = self.vllm_importance_sampling_clip_min, self.importance_sampling_cap
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"trl.vllm_importance_sampling_clip_min ({lo}) > the cap ({hi})")
        if self.use_vllm and self.vllm_mode == "colocate":
            import importlib.util

            where = ("vLLM is importable here, but reinforge does not run it in-process" if importlib.util.find_spec("vllm")
                     else "it needs vLLM importable in the training environment, and it is not (vLLM lives in its own "
                          "environment: `make vllm`)")
            raise ValueError(f"trl.vllm_mode: colocate is not supported: {where}; use vllm_mode: server with "
                             f"`reinforge vllm-serve CONFIG` in another terminal")
        return self
