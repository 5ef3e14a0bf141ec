"""Several processes computing what one process computes: batch plans, gathers, launching, back-ends.

Data parallelism is explicit here rather than left to accelerate's data-loader wrapper, so that the rows
of every micro-batch are a pure function of (seed, position) — which is what makes resume exact and
lets an error name the rows of a step:

- `BatchPlan`: epoch e reads the rows in the order `torch.randperm(n)` with a generator seeded with
  `seed + e`, so any epoch's order is known without replaying the earlier ones. Global micro-batch k takes
  the next `per_process × world` rows of that order; process r reads the r-th contiguous slice. With one
  process, the last micro-batch of an epoch may be short (as a DataLoader); with several, it is filled up
  from the start of the epoch's order (accelerate's `even_batches`), because every process must run the
  same number of forward/backward passes.
- `gather_rows` / `sum_across`: collectives over `torch.distributed` (no-ops in a single process).
- `relaunch`: the `--num-processes N` convenience: N copies of this CLI with torchrun's environment.
- `accelerator_plugins`: `deepspeed` / `fsdp` config keys → accelerate plugins (need GPUs).
- `prepare_frozen_model`: a reference model for inference under DeepSpeed ZeRO-3 (or plain placement).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import torch

from reinforge.config.run import fsdp_plugin_kwargs
from reinforge.config.schema import ReinforgeConfig


def dist_ready() -> bool:
    """True when torch.distributed is initialised (several processes)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchPlan:
    """Which rows of a dataset every process reads for each global micro-batch (see module docstring).

    Args:
        n_rows: rows in the dataset (>= 1).
        per_process: rows per micro-batch per process.
        rank, world_size: this process and the number of processes.
        seed: the run's seed; epoch e shuffles with `seed + e`.
        drop_last: drop an epoch's last incomplete global micro-batch (GRPO prompt batches do).
    Raises:
        ValueError: no rows, or with drop_last fewer rows than one global micro-batch.
    """

    def __init__(self, n_rows: int, per_process: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = False):
        if n_rows < 1:
            raise ValueError("no rows to train on")
        self.n_rows, self.per_process, self.rank, self.world_size = n_rows, per_process, rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.global_size = per_process * world_size
        self.per_epoch = n_rows // self.global_size if drop_last else math.ceil(n_rows / self.global_size)
        if self.per_epoch == 0:
            raise ValueError(f"{n_rows} rows cannot fill one batch of {self.global_size} rows "
                             f"({per_process} per process × {world_size} processes)")
        self._order: tuple[int, list[int]] | None = None

    def layout(self) -> dict[str, Any]:
        """What a data position means under this plan (a checkpoint's position is valid for an equal layout)."""
        return {"rows": self.n_rows, "per_process": self.per_process, "processes": self.world_size,
                "seed": self.seed, "drop_last": self.drop_last}

    def order(self, epoch: int) -> list[int]:
        """The row order of `epoch`."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=g).tolist())
        return self._order[1]

    def epoch_of(self, k: int) -> int:
        """The epoch of global micro-batch k (0-based)."""
        return k // self.per_epoch

    def global_rows(self, k: int) -> list[int]:
        """Row indices of global micro-batch k, all processes (process r's are the r-th slice)."""
        order = self.order(self.epoch_of(k))
        j = k % self.per_epoch
        rows = order[j * self.global_size:(j + 1) * self.global_size]
        if len(rows) < self.global_size and self.world_size > 1:
            rows = rows + [order[i % len(order)] for i in range(self.global_size - len(rows))]
        return rows

    def rows(self, k: int) -> list[int]:
        """Row indices this process reads for global micro-batch k."""
        rows = self.global_rows(k)
        if self.world_size == 1:
            return rows
        return rows[self.rank * self.per_process:(self.rank + 1) * self.per_process]


class BatchStream:
    """Endless iterator of (epoch, rows, collated batch) from a `BatchPlan`, starting at micro-batch `start`.

    `position` is the number of global micro-batches consumed so far: the data position a checkpoint
    stores. The rows yielded are the indices (all processes) of the global micro-batch. A collator with a
    `with_global_batch(rows, global_rows, offset)` method (KTO's, whose mismatched KL pairs rotate over the
    global micro-batch) sees this process's rows as that method returns them.
    """

    def __init__(self, plan: BatchPlan, data: list[dict[str, Any]], collate: Callable, start: int = 0):
        self.plan, self.data, self.collate, self.position = plan, data, collate, start

    def __iter__(self) -> Iterator[tuple[int, list[int], dict[str, Any]]]:
        return self

    def __next__(self) -> tuple[int, list[int], dict[str, Any]]:
        k = self.position
        self.position += 1
        global_rows = self.plan.global_rows(k)
        rows = [self.data[i] for i in self.plan.rows(k)]
        if (hook := getattr(self.collate, "with_global_batch", None)) is not None:
            offset = self.plan.rank * self.plan.per_process if self.plan.world_size > 1 else 0
            rows = hook(rows, [self.data[i] for i in global_rows], offset)
        return self.plan.epoch_of(k), global_rows, self.collate(rows)


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective needs `t`: the current GPU under NCCL, else where it is."""
    if "nccl" in str(torch.distributed.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all processes along dim 0, in rank order (identity for one process).
    The result is on `t`'s device."""
    if not dist_ready():
        return t
    x = t.detach().to(_comm_device(t)).contiguous()
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a detached copy on `t`'s device; identity for one process)."""
    if not dist_ready():
        return t.detach().clone()
    x = t.detach().to(_comm_device(t)).clone()
    torch.distributed.all_reduce(x)
    return x.to(t.device)


def broadcast_from_main(obj: Any) -> Any:
    """The main process's `obj` on every process (a picklable object; identity for one process). Every process
    must call it, from its main thread."""
    if not dist_ready():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_names(names: list[str]) -> list[str]:
    """The sorted union of every process's `names` (one object collective)."""
    if not dist_ready():
        return sorted(set(names))
    out: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, list(names))
    return sorted({n for part in out for n in (part or [])})


def any_across(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Element-wise logical OR of boolean flags over processes (one collective)."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=device)
    return [bool(v > 0) for v in sum_across(t).tolist()]


# ---------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch(num_processes: int, argv: list[str], grace_seconds: float = 300.0) -> int:
    """Run `reinforge <argv>` in `num_processes` processes on this machine (torch.distributed env:// rendezvous).

    Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT (what torchrun sets) and
    OMP_NUM_THREADS = cores / processes unless set. The workers share this launcher's process group, so a
    terminal's Ctrl-C reaches each of them exactly once (the launcher itself ignores SIGINT and waits); a
    SIGTERM sent to the launcher is forwarded to every worker. When a worker fails while others still run
    (they would wait in a collective forever), the others are killed after `grace_seconds`.

    Returns the first non-zero exit code in rank order (130/143 after an interruption), else 0.
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(num_processes),
               LOCAL_WORLD_SIZE=str(num_processes))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    procs = [subprocess.Popen([sys.executable, "-m", "reinforge.cli", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(num_processes)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    deadline = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return next((c for c in codes if c != 0), 0)
            if deadline is None and any(c not in (None, 0) for c in codes):
                deadline = time.monotonic() + grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launched_world_size() -> int:
    """WORLD_SIZE set by a launcher (torchrun, accelerate launch), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------------------- back-ends
def deepspeed_config(cfg: ReinforgeConfig) -> dict[str, Any]:
    """The `deepspeed` config with its `auto` values filled from reinforge's keys.

    train_micro_batch_size_per_gpu = micro_batch_size, gradient_accumulation_steps, gradient_clipping =
    max_grad_norm (0 = off), bf16/fp16 `enabled`; `train_batch_size: auto` is removed (DeepSpeed derives it).
    Accelerate would infer these from a prepared data loader, which the loops do not hand it.
    """
    ds = cfg.deepspeed_dict or {}
    fill = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "gradient_clipping": cfg.max_grad_norm or 0.0}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    for key, on in (("bf16", cfg.bf16 is True), ("fp16", cfg.fp16)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = on
    return ds


def accelerator_plugins(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Keyword arguments for `accelerate.Accelerator` from the `deepspeed` / `fsdp` keys ({} when unset).

    Raises:
        RuntimeError: `deepspeed` set but the package is not installed.
    """
    if cfg.deepspeed is not None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("deepspeed: the deepspeed package is not installed (it needs CUDA); "
                               "pip install deepspeed on the GPU machine") from exc
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))}
    if cfg.fsdp_enabled:
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(cfg.fsdp, cfg.fsdp_config))}
    return {}


def is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def is_sharded(accelerator) -> bool:
    """True under DeepSpeed or FSDP (model/optimizer states are sharded; checkpoints go through accelerate)."""
    kind = str(accelerator.distributed_type)
    return kind.endswith("DEEPSPEED") or kind.endswith("FSDP")


def prepare_frozen_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (the reference) for inference on every process.

    Under DeepSpeed ZeRO-3 the parameters must be partitioned like the policy's, so the model becomes a
    DeepSpeed inference engine of the same config without optimizer (stage 3 keeps its partitioning; lower
    stages run as stage 0). Otherwise accelerate's evaluation-mode placement (no DDP wrapper).
    """
    if not is_deepspeed(accelerator):
        return accelerator.prepare_model(model, evaluation_mode=True)
    import copy

    import deepspeed

    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        ds["zero_optimization"] = {"stage": 0}
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def loss_for_backward(loss: torch.Tensor, accelerator, gradient_accumulation_steps: int) -> torch.Tensor:
    """The loss to pass to `accelerator.backward` when the loop has already divided it by the accumulation
    steps: DeepSpeed divides by its own `gradient_accumulation_steps` again, so it gets the undivided loss."""
    return loss * gradient_accumulation_steps if is_deepspeed(accelerator) else loss
