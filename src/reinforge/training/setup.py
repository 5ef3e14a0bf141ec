"""Run set-up shared by every loop: output directory policy, accelerator, seeds, logging."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from reinforge.config.schema import ReinforgeConfig
from reinforge.training.checkpoint import find_latest_checkpoint, is_complete, list_checkpoints


class RunError(RuntimeError):
    """A run that cannot start or continue, with the reason and the fix."""


def prepare_output_dir(cfg: ReinforgeConfig, accelerator=None, resuming: bool = False) -> Path:
    """Create `output_dir`; a non-empty one is an error unless `overwrite_output_dir: true` (then emptied)
    or the run resumes from a checkpoint (then it is kept as it is).

    Every process checks; only the main process deletes or creates (then all wait for it).
    """
    out = Path(cfg.output_dir)
    non_empty = not resuming and out.exists() and any(out.iterdir())
    if problem := output_dir_problem(cfg, resuming):
        raise RunError(problem)
    main = accelerator is None or accelerator.is_main_process
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if main and non_empty:
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out


def output_dir_problem(cfg: ReinforgeConfig, resuming: bool) -> str | None:
    """Why training may not write into `output_dir` (not empty, no overwrite_output_dir, not resuming), or None."""
    out = Path(cfg.output_dir)
    if resuming or cfg.overwrite_output_dir or not out.is_dir() or not any(out.iterdir()):
        return None
    latest = find_latest_checkpoint(out)
    hint = f", or resume it with resume_from_checkpoint=true (latest: {latest.name})" if latest else ""
    return (f"output_dir {out} is not empty; set overwrite_output_dir: true (or pass overwrite_output_dir=true) "
            f"to replace it, or choose another output_dir{hint}")


def gpu_problems(cfg: ReinforgeConfig) -> list[str]:
    """Keys that need a CUDA GPU when there is none (fp16, flash/flex attention, FSDP); `make_accelerator` refuses
    them and `reinforge validate` reports them. One line each, with the fix."""
    import torch

    if torch.cuda.is_available():
        return []
    problems = [FP16_ON_CPU] if cfg.fp16 else []
    if cfg.flash_attention:
        problems.append("flash_attention: true needs a CUDA GPU and the flash-attn package; set flash_attention: "
                        "false on this machine (sdpa)")
    if cfg.flex_attention:
        problems.append("flex_attention: true needs a CUDA GPU (PyTorch's FlexAttention has no backward on CPU); set "
                        "flex_attention: false on this machine (sdpa; strided EBFT does not need it)")
    if cfg.fsdp_enabled:
        problems.append("fsdp / fsdp_config need CUDA GPUs (one process per GPU); remove them on this machine, or "
                        "use --num-processes N for plain data parallelism on CPU")
    return problems


def environment_problems(cfg: ReinforgeConfig) -> list[str]:
    """What this machine lacks for the config, found without loading anything: `gpu_problems`, `adapter: qlora`
    without a GPU, a tracker's or DeepSpeed's package not installed. Each entry is one line with the fix."""
    import torch

    problems = gpu_problems(cfg)
    if cfg.adapter == "qlora" and not torch.cuda.is_available():
        problems.append(QLORA_ON_CPU)
    for on, package, key in ((cfg.use_wandb_value, "wandb", "use_wandb"), (cfg.use_mlflow_value, "mlflow", "use_mlflow"),
                             (cfg.use_trackio, "trackio", "use_trackio"), (cfg.deepspeed is not None, "deepspeed", "deepspeed")):
        if on and importlib.util.find_spec(package) is None:
            problems.append(_missing(package, key))
    return problems


FP16_ON_CPU = "fp16 mixed precision needs a GPU; use bf16: true (or neither) on CPU"
QLORA_ON_CPU = "adapter: qlora needs a CUDA GPU (bitsandbytes 4-bit); use adapter: lora on this machine"


def _missing(package: str, key: str) -> str:
    return f"{key}: the {package} package is not installed; pip install {package} (or remove {key})"


def resolve_resume(cfg: ReinforgeConfig) -> Path | None:
    """The checkpoint to resume from: `resume_from_checkpoint` as a path, or (true) the latest complete
    checkpoint in output_dir; None when not resuming.

    Raises:
        RunError: no complete checkpoint there (an interrupted save leaves only `checkpoint-N.tmp`).
    """
    value = cfg.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
        path = find_latest_checkpoint(cfg.output_dir)
        if path is None:
            partial = sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint-*")) if Path(cfg.output_dir).is_dir() else []
            found = f" (found only incomplete: {', '.join(partial)})" if partial else ""
            raise RunError(f"resume_from_checkpoint: true, but output_dir {cfg.output_dir} holds no complete "
                           f"checkpoint{found}; remove resume_from_checkpoint to start a new run")
        return path
    path = Path(value)
    if not is_complete(path):
        why = "does not exist" if not path.exists() else "is not a complete checkpoint (no trainer_state.json)"
        raise RunError(f"resume_from_checkpoint: {path} {why}; complete checkpoints in {cfg.output_dir}: "
                       f"{', '.join(p.name for p in list_checkpoints(cfg.output_dir)) or 'none'}")
    return path


def _require(package: str, key: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise RunError(_missing(package, key))


def build_trackers(cfg: ReinforgeConfig) -> list:
    """accelerate trackers for the `use_*` keys (TensorBoard under output_dir/runs, W&B, MLflow, trackio).

    Raises:
        RunError: a tracker whose package is not installed.
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    def given(**kwargs):
        return {k: v for k, v in kwargs.items() if v is not None}

    trackers = []
    if cfg.use_tensorboard:
        trackers.append(TensorBoardTracker("runs", cfg.output_dir))
    if cfg.use_wandb_value:
        _require("wandb", "use_wandb")
        trackers.append(WandBTracker(cfg.wandb_project or "reinforge", **given(
            name=cfg.wandb_name, entity=cfg.wandb_entity, mode=cfg.wandb_mode, dir=cfg.output_dir)))
    if cfg.use_mlflow_value:
        _require("mlflow", "use_mlflow")
        if cfg.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = cfg.mlflow_tracking_uri
        trackers.append(MLflowTracker(experiment_name=cfg.mlflow_experiment_name or "reinforge",
                                      run_name=cfg.mlflow_run_name))
    if cfg.use_trackio:
        _require("trackio", "use_trackio")
        trackers.append(TrackioTracker(cfg.trackio_project or "reinforge", **given(name=cfg.trackio_run_name)))
    return trackers


def make_accelerator(cfg: ReinforgeConfig):
    """accelerate's Accelerator with the configured precision, trackers and DeepSpeed/FSDP plugin."""
    import torch
    from accelerate import Accelerator

    if problems := gpu_problems(cfg):  # keys this machine cannot honour: refused, not ignored
        raise RunError(problems[0])
    if cfg.bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = bool(cfg.bf16)
    precision = "bf16" if bf16 else "fp16" if cfg.fp16 else "no"
    from reinforge.training.distributed import accelerator_plugins, launched_world_size

    try:
        plugins = accelerator_plugins(cfg)
    except RuntimeError as exc:
        raise RunError(str(exc)) from None
    # Several CPU processes (torchrun/accelerate launch without GPUs) run as MULTI_CPU over gloo only with cpu=True.
    cpu = launched_world_size() > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=precision, log_with=build_trackers(cfg) or None, project_dir=cfg.output_dir,
                       cpu=cpu, **plugins)


def setup_logging() -> None:
    """INFO logging on the main process (RANK 0 or unset); warnings and errors only on the others."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_run(cfg: ReinforgeConfig):
    """What every loop does first: the resume point, the accelerator, the output directory, the seed,
    the tokenizer, the prepared data (main process first, others read its cache) and the policy.

    Returns: (resume, accelerator, out_dir, tokenizer, data, policy).
    """
    import torch

    from reinforge.data.prepare import prepare_data
    from reinforge.models.loading import load_policy, load_tokenizer

    resume = resolve_resume(cfg)
    accelerator = make_accelerator(cfg)
    out_dir = prepare_output_dir(cfg, accelerator, resuming=resume is not None)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():
        data = prepare_data(cfg, tokenizer)
    return resume, accelerator, out_dir, tokenizer, data, load_policy(cfg)
