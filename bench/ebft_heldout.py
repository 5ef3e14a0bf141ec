"""Held-out cross-entropy of an EBFT run, before and after: the base model and the trained adapter (output_dir) on
documents the run never saw (the paper's claim is a lower validation CE than SFT's).

- strided configs: examples/data/cpython/heldout.jsonl (CPython modules not in the training slice), next-token CE
  over each document's first sequence_len tokens;
- structured configs: the first 50 rows of examples/data/gsm8k/test.jsonl, CE of the reference answer given the
  question (chat template), answer tokens only.

Usage: .venv/bin/python bench/ebft_heldout.py CONFIG [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def sequences(cfg, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, first scored position) of each held-out document."""
    if cfg.ebft.mode == "strided":
        rows = [json.loads(l) for l in (ROOT / "examples/data/cpython/heldout.jsonl").read_text().splitlines()]
        return [(tokenizer(r["text"], add_special_tokens=False)["input_ids"][: cfg.sequence_len], 1) for r in rows]
    rows = [json.loads(l) for l in (ROOT / "examples/data/gsm8k/test.jsonl").read_text().splitlines()[:50]]
    out = []
    for r in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                               add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append((p + tokenizer(r["answer"], add_special_tokens=False)["input_ids"], len(p)))
    return out


@torch.no_grad()
def mean_ce(model, data: list[tuple[list[int], int]]) -> float:
    total, count = 0.0, 0
    for ids, start in data:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)[max(start - 1, 0):]
        total, count = total + float(nll.sum()), count + nll.numel()
    return total / count


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reinforge.config.loader import load_config

    cfg = load_config(sys.argv[1], sys.argv[2:])
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_config or cfg.base_model)
    data = sequences(cfg, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32).eval()
    before = mean_ce(base, data)
    trained = PeftModel.from_pretrained(base, cfg.output_dir).eval()
    after = mean_ce(trained, data)
    tokens = sum(len(ids) - max(start, 1) for ids, start in data)
    print(f"held-out cross-entropy ({len(data)} documents, {tokens} scored tokens): "
          f"base {before:.4f} nats/token, after EBFT {after:.4f} ({after - before:+.4f})")


if __name__ == "__main__":
    main()
