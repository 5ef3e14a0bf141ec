"""W-DPO benchmark: reinforge vs TRL 1.16 DPOTrainer on the same workload, each side in its own process.

W-DPO: SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct, `make model`), float32, the first 32 rows of
examples/data/dpo_en_demo.json with the chat template (keys as examples/dpo-smollm2.yaml), sequence_len /
max_length 1024 (keep_start), micro-batch 4 pairs, gradient accumulation 1, AdamW, constant learning rate,
max_grad_norm 1.0, β 0.1, sigmoid loss, 6 steps in file order (no shuffling, so both sides see the same
batches). Full fine-tune with a frozen reference copy, or LoRA r=16 (α 32, all linear layers) with the
adapter-disabled policy as reference.

Sides (each a subprocess, so peak RSS is per side):
- reinforge: the components `reinforge train` uses (prepare_data, load_policy/load_reference,
  build_collator, LogpsModel, build_objective, build_optimizer), driven by a minimal loop (no accelerate,
  logging or checkpointing); the config defaults, i.e. packing + prefix sharing + chunked log-probs;
- trl: `trl.DPOTrainer` with `DPOConfig` set to the same workload (bf16 and gradient checkpointing off, as
  ours); trl-gc: the same with TRL's default `gradient_checkpointing=True` (less memory, more compute);
- floor: a bare forward+backward of the policy and a no-grad forward of the reference over exactly the real
  tokens (prompt + chosen + rejected of each pair, once: one causal sequence per pair), LM head on the
  completion positions only; no optimizer step. A lower bound for any implementation of this step.

Timing: seconds per optimizer step (collation, policy forward+backward, reference forward, clipping and
AdamW step); the first step is a warm-up, the table shows the median of the others. Peak RSS is the
process's ru_maxrss (model load included). Usage:

    .venv/bin/python bench/preference.py                    # full and LoRA: reinforge, trl, floor
    .venv/bin/python bench/preference.py --sides reinforge,trl,trl-gc,floor
    .venv/bin/python bench/preference.py --adapter full --json out.json
    .venv/bin/python bench/preference.py --sides reinforge --set prefix_sharing=false   # ablation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "examples" / "data" / "dpo_en_demo.json"
ROWS, BATCH, SEQ_LEN, BETA, SEED = 32, 4, 1024, 0.1, 42
LR = {"full": 5e-6, "lora": 1e-4}
LORA = {"r": 16, "alpha": 32}
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _rows() -> list[dict]:
    return json.loads(DATA.read_text())[:ROWS]


def _ids_digest(rows: list[tuple[list[int], list[int], list[int]]]) -> str:
    """Digest of the sequences actually trained on: (prompt + chosen)[:1024], (prompt + rejected)[:1024] and
    the prompt length. (reinforge truncates at tokenisation, TRL in its collator: same sequences.)"""
    seqs = [((p + c)[:SEQ_LEN], (p + r)[:SEQ_LEN], len(p)) for p, c, r in rows]
    return hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load() -> list[float]:
    return list(os.getloadavg())


# ------------------------------------------------------------------------------------------------ reinforge

def _reinforge_config(adapter: str, overrides: dict, data_path: str, prepared: str):
    from reinforge.config.loader import build_config

    cfg = {
        "base_model": str(MODEL_DIR), "rl": "dpo", "rl_beta": BETA,
        "datasets": [{"path": data_path, "type": "chat_template.default", "field_messages": "conversations",
                      "field_chosen": "chosen", "field_rejected": "rejected",
                      "message_property_mappings": {"role": "from", "content": "value"},
                      "roles": {"user": ["human"], "assistant": ["gpt"]}}],
        "sequence_len": SEQ_LEN, "excess_length_strategy": "truncate", "truncation_mode": "keep_start",
        "shuffle_merged_datasets": False, "dataset_prepared_path": prepared,
        "micro_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR[adapter],
        "lr_scheduler": "constant", "optimizer": "adamw_torch", "max_grad_norm": 1.0, "seed": SEED,
        "use_tensorboard": False,
    }
    if adapter == "lora":
        cfg.update(adapter="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                   lora_target_linear=True)
    cfg.update(overrides)
    return build_config(cfg)


def run_reinforge(adapter: str, steps: int, overrides: dict) -> dict:
    import torch

    from reinforge.data.packing import build_collator
    from reinforge.data.prepare import prepare_data
    from reinforge.models.forward import LogpsModel
    from reinforge.models.loading import load_policy, load_reference, load_tokenizer
    from reinforge.training.objectives import build_objective
    from reinforge.training.optim import build_optimizer

    tmp = tempfile.mkdtemp(prefix="bench-reinforge-")
    data_path = Path(tmp) / "dpo32.json"
    data_path.write_text(json.dumps(_rows()))
    cfg = _reinforge_config(adapter, overrides, str(data_path), str(Path(tmp) / "prepared"))
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg)
    reference = load_reference(cfg, policy)
    objective = build_objective(cfg)
    module = LogpsModel(policy, chunked=cfg.chunked_logprobs, stats=objective.token_stats)  # as `reinforge train`
    module.train()
    collate = build_collator(cfg, "paired", tokenizer.pad_token_id)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    times, cpu, losses, layout = [], [], [], []
    for step in range(steps):
        rows = data.train[step * BATCH:(step + 1) * BATCH]
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collate(rows)
        out = module(**batch)
        with reference.active(module) as ref_module:
            ref = ref_module(**batch)["logps"].detach()
        loss, _ = objective(out, ref, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
        layout.append([list(batch["input_ids"].shape), int(batch["attention_mask"].sum())])
    ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in data.train[:steps * BATCH]]
    return {"times": times, "cpu_times": cpu, "losses": losses, "rows_x_len_and_tokens": layout,
            "ids_digest": _ids_digest(ids), "attn": module.attn_implementation,
            "settings": {k: getattr(cfg, k) for k in ("sample_packing_value", "prefix_sharing_value",
                                                      "packing_length_value", "chunked_logprobs")}}


# ------------------------------------------------------------------------------------------------ TRL

def _trl_dataset():
    from datasets import Dataset

    out = []
    for r in _rows():
        prompt = [{"role": ROLES[m["from"]], "content": m["value"]} for m in r["conversations"]]
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]})
    return Dataset.from_list(out)


def run_trl(adapter: str, steps: int, gradient_checkpointing: bool) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times, cpu, losses, shapes = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if isinstance(result, tuple) else result
            if model.training:
                losses.append(float(loss.detach()))
                shapes.append([list(inputs["input_ids"].shape), int(inputs["attention_mask"].sum())])
            return result

    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    args = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR[adapter], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=SEQ_LEN,
        truncation_mode="keep_start", bf16=False, fp16=False, gradient_checkpointing=gradient_checkpointing,
        use_cpu=True, seed=SEED, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential", model_init_kwargs={"dtype": "float32"},
    )
    peft_config = None
    if adapter == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    trainer = Trainer(model=str(MODEL_DIR), args=args, train_dataset=_trl_dataset(), processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Timer()])
    ds = trainer.train_dataset
    ids = [(ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) for i in range(min(len(ds), steps * BATCH))]
    trainer.train()
    del torch
    return {"times": times, "cpu_times": cpu, "losses": losses, "rows_x_len_and_tokens": shapes,
            "ids_digest": _ids_digest(ids), "gradient_checkpointing": gradient_checkpointing}


# ------------------------------------------------------------------------------------------------ floor

def run_floor(adapter: str, steps: int) -> dict:
    """Bare policy forward+backward and reference forward over the real tokens of each batch.

    The real tokens of a pair are prompt + chosen + rejected, once; the four pairs of a batch form one
    packed row of causal sequences (no padding, no duplicated token, no masks beyond causal-per-pair, the
    cheapest attention available: sdpa per sequence). The LM head and log-softmax run once over the
    completion positions (no chunking, no recomputation). No clipping, no optimizer step.
    """
    import torch
    import torch.nn.functional as F

    from reinforge.data.packing import UNLIMITED, pack_sequences
    from reinforge.data.prepare import prepare_data
    from reinforge.models.forward import LogpsModel
    from reinforge.models.loading import load_policy, load_reference, load_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench-floor-")
    data_path = Path(tmp) / "dpo32.json"
    data_path.write_text(json.dumps(_rows()))
    cfg = _reinforge_config(adapter, {}, str(data_path), str(Path(tmp) / "prepared"))
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg)
    policy.train()
    module = LogpsModel(policy)  # for its attention set-up only
    frozen = load_reference(cfg, policy).model  # None with LoRA: the adapter-disabled policy is the reference
    ref_module = frozen if frozen is not None else module

    def completion_logps(m, batch):
        inner = m.model.get_base_model() if hasattr(m.model, "get_base_model") else m.model
        decoder, head = getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()
        mask, extra = m._attention_inputs(batch["attention_mask"], batch["segment_ids"], None, torch.float32)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                         use_cache=False, **extra).last_hidden_state
        scored = batch["targets"] != -100
        logits = F.linear(hidden[scored], head.weight)
        return logits.log_softmax(-1).gather(-1, batch["targets"][scored].unsqueeze(-1)).sum()

    times, cpu, tokens = [], [], []
    for step in range(steps):
        rows = data.train[step * BATCH:(step + 1) * BATCH]
        seqs = [(r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"], len(r["prompt_ids"])) for r in rows]
        batch = pack_sequences(seqs, tokenizer.pad_token_id, capacity=UNLIMITED)
        t0, c0 = time.perf_counter(), time.process_time()
        completion_logps(module, batch).backward()
        with torch.no_grad():
            if frozen is None:
                with policy.disable_adapter():
                    completion_logps(module, batch)
            else:
                completion_logps(ref_module, batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        policy.zero_grad(set_to_none=True)
        tokens.append(int(batch["attention_mask"].sum()))
    return {"times": times, "cpu_times": cpu, "real_tokens": tokens}


# ------------------------------------------------------------------------------------------------ driver

def _child(side: str, adapter: str, steps: int, overrides: dict, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    load0 = _load()
    if side == "reinforge":
        result = run_reinforge(adapter, steps, overrides)
    elif side in ("trl", "trl-gc"):
        result = run_trl(adapter, steps, gradient_checkpointing=side == "trl-gc")
    else:
        result = run_floor(adapter, steps)
    result.update(side=side, adapter=adapter, peak_rss_mb=_peak_rss_mb(), load_before=load0, load_after=_load(),
                  threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(side: str, adapter: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--adapter", adapter, "--steps",
           str(args.steps)]
    for item in args.set:
        cmd += ["--set", item]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    print(f"[bench] {side} / {adapter} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
        print(f"[bench] {side} / {adapter} FAILED: {why}", file=sys.stderr, flush=True)
        return {"side": side, "adapter": adapter, "failed": why, "wall_s": time.perf_counter() - t0}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    print(f"[bench] {side} / {adapter}: {_median(result['times']):.2f} s/step (median), steps "
          f"{[round(t, 1) for t in result['times']]}, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr,
          flush=True)
    return result


def _median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table of the results: {adapter: {side: result}}."""
    lines = ["| workload | side | s/step (median) | min–max | CPU s/step | pairs/s | peak RSS (MB) | reinforge/TRL | "
             "step-1 loss |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for adapter, sides in results.items():
        trl = sides.get("trl") if "failed" not in sides.get("trl", {}) else None
        for side in ("reinforge", "trl", "trl-gc", "floor"):
            r = sides.get(side)
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| W-DPO {adapter} | {side} | failed: {r['failed']} | | | | | | |")
                continue
            med = _median(r["times"])
            rest = r["times"][1:] or r["times"]
            ratio = ""
            if trl is not None and side == "reinforge":
                ratio = (f"{(BATCH / med) / (BATCH / _median(trl['times'])):.2f}× pairs/s, "
                         f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}× RSS")
            loss = f"{r['losses'][0]:.6f}" if r.get("losses") else "—"
            cpu = f"{_median(r['cpu_times']):.1f}" if r.get("cpu_times") else "—"
            lines.append(f"| W-DPO {adapter} | {side} | {med:.2f} | {min(rest):.2f}–{max(rest):.2f} | {cpu} | "
                         f"{BATCH / med:.3f} | {r['peak_rss_mb']:.0f} | {ratio} | {loss} |")
        ours, floor = sides.get("reinforge"), sides.get("floor")
        ours = None if ours is None or "failed" in ours else ours
        floor = None if floor is None or "failed" in floor else floor
        if ours and floor:
            notes.append(f"{adapter}: reinforge step = {_median(ours['times']) / _median(floor['times']):.2f}× the floor")
        gc = sides.get("trl-gc")
        if ours and gc and "failed" not in gc:
            notes.append(f"{adapter}: vs TRL with gradient checkpointing: "
                         f"{_median(gc['times']) / _median(ours['times']):.2f}× pairs/s, "
                         f"{ours['peak_rss_mb'] / gc['peak_rss_mb']:.2f}× RSS")
        trl = trl or (gc if gc and "failed" not in gc else None)
        if ours and trl:
            n = min(len(ours["losses"]), len(trl["losses"]))
            diffs = [abs(a - b) for a, b in zip(ours["losses"][:n], trl["losses"][:n])]
            notes.append(f"{adapter}: |loss reinforge − TRL| step 1 = {diffs[0]:.2e}, max over {n} steps = "
                         f"{max(diffs):.2e}; same token ids: {ours['ids_digest'] == trl['ids_digest']}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def machine() -> str:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", choices=["full", "lora", "both"], default="both")
    parser.add_argument("--sides", default="reinforge,trl,floor",
                        help="comma-separated, in order, from reinforge, trl, trl-gc, floor")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="reinforge config override (YAML value), e.g. prefix_sharing=false")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's)")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="only print the table of saved --json files (later files override earlier ones)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    adapters = ["full", "lora"] if args.adapter == "both" else [args.adapter]
    if args.child:
        _child(args.child, adapters[0], args.steps, overrides, args.threads)
        return
    if args.render:
        merged: dict[str, dict[str, dict]] = {}
        for path in args.render:
            for adapter, sides in json.loads(Path(path).read_text())["results"].items():
                merged.setdefault(adapter, {}).update(sides)
        print(table(merged))
        return
    if not (MODEL_DIR / "config.json").exists():
        raise SystemExit(f"{MODEL_DIR} missing: run `make model`")
    results: dict[str, dict[str, dict]] = {}
    for adapter in adapters:
        for side in args.sides.split(","):
            results.setdefault(adapter, {})[side] = _spawn(side, adapter, args)
            if args.json:  # after every side, so that a later failure loses nothing
                Path(args.json).write_text(json.dumps({"overrides": overrides, "results": results}, indent=1))
    print(f"Machine: {machine()}")
    print("Load average before/after each side: " + "; ".join(
        f"{a}/{s}: {r['load_before'][0]:.1f}→{r['load_after'][0]:.1f}" for a, sides in results.items()
        for s, r in sides.items() if "load_before" in r))
    if overrides:
        print(f"reinforge overrides: {overrides}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "overrides": overrides, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
