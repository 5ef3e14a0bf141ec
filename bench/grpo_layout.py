"""GRPO micro-batch layout: one padded row per completion vs the prompt shared by its completions.

Workload: SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct, `make model`), float32, LoRA r=16 on all
linear layers (as examples/grpo-gsm8k.yaml), the GSM8K example's prompts (`reinforge_gsm8k.transform`:
system message, one worked exchange, question) of training rows 0..P-1, each with G completions taken
from GSM8K reference solutions (rows P.., varied lengths, ending with <|im_end|>), micro-batches of G
completions (one prompt group). Timed: the policy forward with gradient (chunked log-probs, entropy), the
clipped-surrogate loss (dapo aggregation) and backward, per micro-batch; median over all micro-batches after
one warm-up. The two layouts are interleaved so that machine drift hits both. Also prints the largest
difference between the two layouts' per-token log-probs (float32 rounding).

    .venv/bin/python bench/grpo_layout.py [--prompts 4] [--generations 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
GSM8K = ROOT / "examples" / "data" / "gsm8k" / "train.jsonl"


def main(argv: list[str] | None = None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reinforge.algorithms.aggregation import aggregate_loss
    from reinforge.algorithms.policy_losses import policy_loss_terms
    from reinforge.data.collate import pad_sequences
    from reinforge.data.formats.strategies.reinforge_gsm8k import transform
    from reinforge.data.packing import UNLIMITED, relayout
    from reinforge.models.forward import LogpsModel
    from reinforge.rollout.prepare import RolloutBatch, per_token

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    P, G = args.prompts, args.generations

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: P + P * G]]
    fn, _ = transform()
    seqs = []
    for p in range(P):
        text = tok.apply_chat_template(fn(rows[p])["prompt"], tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for g in range(G):
            comp = tok(rows[P + p * G + g]["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            seqs.append((prompt + comp, len(prompt)))
    batch = pad_sequences(seqs, tok.pad_token_id)
    n = batch["n_tokens"]
    mask = torch.arange(int(n.max())).unsqueeze(0) < n.unsqueeze(1)
    advantages = torch.linspace(-1.0, 1.0, P * G)
    rollout = RolloutBatch(batch, mask, advantages, None, None, {}, loss_tokens=float(mask.sum()))

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    module = LogpsModel(model)
    module.train()
    layouts = {"padded": lambda b: b, "shared": lambda b: relayout(b, tok.pad_token_id, UNLIMITED, True)}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    positions: dict[str, int] = {k: 0 for k in layouts}
    losses: dict[str, list[float]] = {k: [] for k in layouts}  # per-token log-probs of the first pass
    for rep in range(args.repeats + 1):
        for start in range(0, P * G, G):
            mb = rollout.micro_batch(start, G)
            for name, layout in layouts.items():
                t0 = time.perf_counter()
                laid = layout(mb.batch)
                out = module(**laid, stats=("entropy",))
                logps = per_token(out, mb.batch["n_tokens"])
                terms = policy_loss_terms(logps, mb.advantages, mb.mask, epsilon_low=0.2, epsilon_high=0.2)
                loss = aggregate_loss(terms.per_token_loss, mb.mask, "dapo", num_items_in_batch=rollout.loss_tokens)
                loss.backward()
                elapsed = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if rep > 0 or start > 0:  # the very first micro-batch of each layout is a warm-up
                    times[name].append(elapsed)
                if rep == 0:
                    positions[name] += int(laid["input_ids"].numel())
                    losses[name] += per_token(out, mb.batch["n_tokens"])[mb.mask].tolist()
    real = int(sum(len(ids) for ids, _ in seqs))
    print(f"{P} prompts × {G} completions; prompt {seqs[0][1]} tokens; completions "
          f"{min(n.tolist())}–{max(n.tolist())} tokens; {real} real tokens (prompt repeated)")
    print("| layout | positions computed | s / micro-batch (median) | min–max |")
    print("|---|---|---|---|")
    for name in layouts:
        t = times[name]
        print(f"| {name} | {positions[name]} | {statistics.median(t):.2f} | {min(t):.2f}–{max(t):.2f} |")
    speed = statistics.median(times["padded"]) / statistics.median(times["shared"])
    diff = max(abs(a - b) for a, b in zip(losses["padded"], losses["shared"]))
    print(f"shared is {speed:.2f}× faster; max |per-token log-prob difference| {diff:.2e} (float32)")


if __name__ == "__main__":
    main()
