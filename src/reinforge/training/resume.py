"""What a training loop delegates so that a run that dies costs minutes: `RunControl`.

Per run: `start()` resumes from a checkpoint when configured (model, optimizer, scheduler, objective state,
RNG states, data position and per-process loop state). Per optimiser step: `step_ok()` decides whether
the gradients are finite (else the step is skipped and counted, and after `max_consecutive_nonfinite_steps`
in a row the run stops naming the step and its rows); `end_step()` writes the scheduled checkpoint
(`save_strategy`, `save_steps`, `save_total_limit`) and, after SIGINT/SIGTERM, a checkpoint followed by
`TrainingInterrupted`. At the end `save_final()` writes the model into output_dir.

The main process writes the run's report (`training/report.py`, into output_dir/report) at the end of the run
(`summary()`, which names it), after SIGINT/SIGTERM with the checkpoint (the message names it), and when an error
stops the loop after some logged steps (the loops run inside `with run:`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from reinforge.config.schema import ReinforgeConfig
from reinforge.training.checkpoint import (find_latest_checkpoint, load_checkpoint, save_checkpoint, save_model,
                                          write_config)
from reinforge.training.distributed import any_across, is_sharded
from reinforge.training.metrics import flat_config, versions, write_run_info
from reinforge.training.report import try_write_report
from reinforge.training.setup import RunError
from reinforge.training.signals import StopSignal, TrainingInterrupted
from reinforge.training.summary import print_summary

log = logging.getLogger(__name__)

# Keys that may change between an interrupted run and its resumption without changing what is computed.
_FREE_KEYS = {"resume_from_checkpoint", "overwrite_output_dir", "save_steps", "save_strategy", "save_total_limit",
              "logging_steps", "eval_steps", "max_consecutive_nonfinite_steps", "use_tensorboard", "use_wandb",
              "wandb_project", "wandb_entity", "wandb_name", "wandb_mode", "use_mlflow", "mlflow_tracking_uri",
              "mlflow_experiment_name", "mlflow_run_name", "use_trackio", "trackio_project", "trackio_run_name",
              "dataset_prepared_path"}


def describe_rows(data, rows: list[int], limit: int = 12) -> str:
    """'name row i, ...' for training-row indices of a `PreparedData` (its sources and train_origin)."""
    seen: list[int] = []
    for r in rows:
        if r not in seen:
            seen.append(r)
    parts = []
    for r in seen[:limit]:
        src, idx = data.train_origin[r] if data.train_origin else (None, r)
        name = data.sources[src]["name"] if src is not None and data.sources else "train"
        parts.append(f"{name} row {idx}")
    more = f" (+{len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(parts) + more


def resume_command(world_size: int) -> str:
    """The command line that resumes this run (this process's arguments + resume_from_checkpoint=true)."""
    args = sys.argv[1:]
    if "train" in args:
        args = args[args.index("train") + 1:]
    args = [a for a in args if not a.startswith("resume_from_checkpoint=")]
    flag = [f"--num-processes={world_size}"] if world_size > 1 else []
    return shlex.join(["reinforge", "train", *flag, *args, "resume_from_checkpoint=true"])


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps (keys in `_FREE_KEYS` ignored)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in _FREE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} → {b!r})")
    return out


class RunControl:
    """Resume, non-finite steps, checkpoints and signals for one training loop (see the module docstring).

    Args:
        cfg, accelerator, out_dir: the run.
        module: the prepared (possibly DDP-wrapped) LogpsModel; its `.model` is what `save_pretrained` writes.
        tokenizer, optimizer, scheduler, objective: saved in checkpoints (objective when it has `state_dict`).
        data_layout: what the data position means (rows, rows per global micro-batch, seed, ...); a checkpoint
            whose layout differs cannot be continued exactly and is refused.
        describe: training-row indices → a readable list (for the non-finite error).
    Attributes:
        step: the last completed optimiser step (0 before training); skipped_nonfinite_steps: skipped in total.
    """

    def __init__(self, cfg: ReinforgeConfig, accelerator, out_dir: Path, *, module, tokenizer, optimizer, scheduler,
                 objective=None, data_layout: dict[str, Any], describe: Callable[[list[int]], str]):
        self.cfg, self.accelerator, self.out_dir = cfg, accelerator, Path(out_dir)
        self.module, self.tokenizer, self.optimizer, self.scheduler = module, tokenizer, optimizer, scheduler
        self.objective, self.data_layout, self.describe = objective, data_layout, describe
        self.step = 0
        self.skipped_nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.stop = StopSignal(announce=accelerator.is_main_process)

    @property
    def model(self):
        """The unwrapped causal LM (plain or peft)."""
        return self.accelerator.unwrap_model(self.module).model

    # ----------------------------------------------------------------------------------------- start
    def start(self, resume_path: Path | None) -> dict[str, Any]:
        """Resume from `resume_path` (or start fresh); record the start in run_info.jsonl (versions, processes,
        command line), the resolved config in output_dir, and start the trackers with both. Returns the saved
        data position and this process's loop state ({} when starting fresh)."""
        info: dict[str, Any] = {"event": "start", "world_size": self.accelerator.num_processes,
                                "distributed_type": str(self.accelerator.distributed_type), "data": self.data_layout}
        rank_state: dict[str, Any] = {}
        if resume_path is not None:
            try:
                state, rank_state = load_checkpoint(resume_path, model=self.model, optimizer=self.optimizer,
                                                    scheduler=self.scheduler, objective=self.objective,
                                                    accelerator=self.accelerator)
            except (RuntimeError, FileNotFoundError) as exc:
                raise RunError(f"cannot resume from {resume_path}: {exc}") from None
            if state.get("data") != self.data_layout:
                raise RunError(f"cannot resume exactly from {resume_path}: its data layout {state.get('data')} differs "
                               f"from this run's {self.data_layout} (same data, seed, batch sizes and number of "
                               f"processes are needed)")
            self.step = state["step"]
            self.skipped_nonfinite_steps = state.get("skipped_nonfinite_steps", 0)
            self.consecutive_nonfinite = state.get("consecutive_nonfinite_steps", 0)
            rank_state["position"] = state["position"]
            self._warn_config_changes(resume_path)
            info.update(event="resume", checkpoint=str(resume_path), step=self.step)
            log.info("resumed from %s at step %d", resume_path, self.step)
        if self.accelerator.is_main_process:
            write_run_info(self.out_dir, info)
            if resume_path is None:
                write_config(self.cfg, self.out_dir)
        hparams = {**self.cfg.model_dump(mode="json"), "versions": versions(), "world_size": info["world_size"]}
        try:
            self.accelerator.init_trackers("runs", config=flat_config(hparams))
        except Exception as exc:  # a tracker's own error (login, backend URI, ...): name it, stop before training
            names = ", ".join(type(t).__name__ for t in self.accelerator.log_with) or "none"
            raise RunError(f"starting the experiment trackers ({names}) failed: {type(exc).__name__}: {exc}") from exc
        return rank_state

    def _warn_config_changes(self, path: Path) -> None:
        file = path / "reinforge_config.yaml"
        if not file.is_file() or not self.accelerator.is_main_process:
            return
        diff = config_differences(yaml.safe_load(file.read_text()) or {}, self.cfg.model_dump(mode="json"))
        if diff:
            log.warning("resuming with a config that differs from the checkpoint's in %s; the continuation is not "
                        "what the interrupted run would have computed", "; ".join(diff))

    # ------------------------------------------------------------------------------------ per step
    def step_ok(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | float, rows: list[int]) -> bool:
        """True when the step's losses and gradient norm are finite on every process (take the optimiser step).

        Otherwise the step is skipped and counted, with a warning naming the step and its rows.
        Raises:
            RunError: `max_consecutive_nonfinite_steps` non-finite steps in a row.
        """
        values = [float(x) for x in losses] + [float(grad_norm)]
        bad = any_across([not all(math.isfinite(v) for v in values)], self.accelerator.device)[0]
        if not bad:
            self.consecutive_nonfinite = 0
            return True
        self.skipped_nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        limit = self.cfg.max_consecutive_nonfinite_steps
        what = (f"step {step}: non-finite loss or gradient (losses {[round(v, 4) for v in values[:-1]]}, grad_norm "
                f"{values[-1]:.4g} on process {self.accelerator.process_index}); rows of this step: {self.describe(rows)}")
        if self.consecutive_nonfinite >= limit:
            latest = find_latest_checkpoint(self.out_dir)
            raise RunError(f"{what}. {self.consecutive_nonfinite} non-finite steps in a row "
                           f"(max_consecutive_nonfinite_steps: {limit}); stopping. Check these rows, lower the "
                           f"learning_rate or use bf16 instead of fp16. Last checkpoint: {latest or 'none'}")
        if self.accelerator.is_main_process:
            log.warning("%s — step skipped (%d in a row, %d in total; stop after %d in a row)", what,
                        self.consecutive_nonfinite, self.skipped_nonfinite_steps, limit)
        return False

    def optimizer_step(self, step: int, losses: list[torch.Tensor], params: list[torch.Tensor],
                       rows: list[int]) -> torch.Tensor | None:
        """Clip the accumulated gradients to `max_grad_norm`, then, when `step_ok`, take the optimiser and
        scheduler step; the gradients are zeroed either way.

        Returns:
            the gradient norm before clipping (a 0-d tensor) when the step was taken, None when it was skipped.
        Raises:
            RunError: from `step_ok`.
        """
        grad_norm = self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        taken = self.step_ok(step, losses, grad_norm, rows)
        if taken:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if taken else None

    def end_step(self, step: int, position: Any, epoch_done: bool,
                 rank_state: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """After optimiser step `step`: write a scheduled checkpoint; after a signal, write one and raise.

        Args:
            position: the data position after this step (JSON-serialisable, e.g. micro-batches consumed).
            epoch_done: an epoch of the training data ended during this step (for save_strategy: epoch).
            rank_state: this process's loop state to restore on resume (accumulators, in-flight rollout), or a
                callable returning it, called only when a checkpoint is written (it may wait for prefetched rollouts).
        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM (once the checkpoint is written).
        """
        self.step = step
        strategy = self.cfg.save_strategy_value
        scheduled = (strategy == "steps" and step % self.cfg.save_steps == 0) or (strategy == "epoch" and epoch_done)
        stop = any_across([self.stop.requested], self.accelerator.device)[0]
        if scheduled or stop:
            path = self.save(step, position, rank_state() if callable(rank_state) else rank_state)
        if stop:
            signum = self.stop.signum or 15  # another process got the signal: this one stops with it
            report = self.write_report(f"interrupted after step {step}; checkpoint {path}")
            raise TrainingInterrupted(f"interrupted after step {step}; checkpoint written to {path}\n"
                                      + (f"report: {report}\n" if report else "")
                                      + f"resume with: {resume_command(self.accelerator.num_processes)}", signum)

    def write_report(self, status: str) -> Path | None:
        """Write output_dir/report from metrics.jsonl on the main process; returns its index.html, or None on the
        other processes, when nothing was logged yet, and when writing fails (then one warning line says why)."""
        metrics = self.out_dir / "metrics.jsonl"
        if not self.accelerator.is_main_process or not metrics.is_file() or metrics.stat().st_size == 0:
            return None
        return try_write_report(self.out_dir, status)

    def __enter__(self) -> "RunControl":
        """Around the training loop: the signal handlers (`self.stop`), and the report when the loop stops on an
        error after some logged steps."""
        self.stop.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.__exit__(exc_type, exc, tb)
        if isinstance(exc, Exception) and not isinstance(exc, TrainingInterrupted):  # not a second Ctrl-C either
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if report := self.write_report(f"stopped by an error after step {self.step}: {first}"):
                print(f"reinforge: report of the run so far: {report}", file=sys.stderr, flush=True)

    def save(self, step: int, position: Any, rank_state: dict[str, Any]) -> Path:
        """Write checkpoint-<step> (all processes call this)."""
        state = {"position": position, "data": self.data_layout, "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
                 "consecutive_nonfinite_steps": self.consecutive_nonfinite, "rl": self.cfg.rl}
        path = save_checkpoint(self.out_dir, step, model=self.model, tokenizer=self.tokenizer, cfg=self.cfg,
                               optimizer=self.optimizer, scheduler=self.scheduler, state=state, rank_state=rank_state,
                               objective=self.objective, accelerator=self.accelerator, module=self.module,
                               total_limit=self.cfg.save_total_limit)
        return path

    def summary(self, history: list[dict[str, Any]], stats) -> dict[str, Any]:
        """Write the report, then the run summary (`print_summary`, naming the report), on the main process only."""
        report = self.write_report("finished")
        quiet = contextlib.redirect_stdout(io.StringIO()) if not self.accelerator.is_main_process else contextlib.nullcontext()
        with quiet:
            return print_summary(self.cfg, history, stats, self.out_dir, report=report)

    def save_final(self) -> None:
        """The trained model (adapter or full), tokenizer and config into output_dir (all processes call this)."""
        self.accelerator.wait_for_everyone()
        state_dict = None
        if is_sharded(self.accelerator):
            full = self.accelerator.get_state_dict(self.module)
            state_dict = {k.removeprefix("model."): v for k, v in full.items()} if full else None
        if self.accelerator.is_main_process:
            save_model(self.model, self.tokenizer, self.cfg, self.out_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()
