"""Short real-model runs of every example config: first/last loss, main metric and peak RSS per method.

Usage: python bench/methods.py [--steps N] [--out DIR]. Each method runs `reinforge train` in its own
process (peak RSS from the OS); numbers are printed as a Markdown table. Not a test: a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN_METRIC = {"kto": "kl", "orpo": "log_odds_ratio", "grpo-gsm8k": "reward"}
REPORT_ONLY = False
EXAMPLES = ["dpo", "ipo", "mpo", "kto", "orpo", "simpo"]


def run(name: str, steps: int, out: Path) -> dict:
    cfg = ROOT / "examples" / f"{name}-smollm2.yaml"
    target = out / name
    cmd = [sys.executable, "-m", "reinforge.cli", "train", str(cfg), f"output_dir={target}", "overwrite_output_dir=true",
           f"max_steps={steps}", "val_set_size=8", "eval_steps=null", "sequence_len=256", "micro_batch_size=2",
           "gradient_accumulation_steps=1", "use_tensorboard=false", "warmup_steps=0"]
    t0 = time.perf_counter()
    if REPORT_ONLY:
        return read(name, target, 0.0, 0.0)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return read(name, target, usage.ru_maxrss / 2**20, time.perf_counter() - t0)


def read(name: str, target: Path, rss_gb: float, seconds: float) -> dict:
    """First/last train loss and main metric, and the eval loss/metric before and after, from metrics.jsonl."""
    records = [json.loads(l) for l in (target / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in records if "loss" in m]
    evals = [m for m in records if "eval_loss" in m]
    metric = MAIN_METRIC.get(name, "rewards/accuracies")
    return {"method": name, "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"], "metric": metric,
            "first_metric": train[0].get(metric), "last_metric": train[-1].get(metric),
            "eval_loss": (evals[0]["eval_loss"], evals[-1]["eval_loss"]),
            "eval_metric": (evals[0].get(f"eval_{metric}"), evals[-1].get(f"eval_{metric}")),
            "peak_rss_gb": rss_gb, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench-methods"))
    ap.add_argument("--methods", nargs="*", default=EXAMPLES)
    ap.add_argument("--report-only", action="store_true", help="re-read the last runs' metrics, run nothing")
    args = ap.parse_args()
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    rows = []
    for name in args.methods:
        rows.append(run(name, args.steps, Path(args.out)))
        print(json.dumps(rows[-1]), flush=True)
    dpo = next((r for r in rows if r["method"] == "dpo"), rows[0])
    print("\n| method | train loss first → last | main metric | train first → last | eval loss before → after | "
          "eval metric before → after | peak RSS (GB) | RSS vs DPO | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = r["peak_rss_gb"] / dpo["peak_rss_gb"] if dpo["peak_rss_gb"] else float("nan")
        print(f"| {r['method']} | {r['first_loss']:.4f} → {r['last_loss']:.4f} | {r['metric']} | "
              f"{r['first_metric']:.4f} → {r['last_metric']:.4f} | {r['eval_loss'][0]:.4f} → {r['eval_loss'][1]:.4f} | "
              f"{r['eval_metric'][0]:.4f} → {r['eval_metric'][1]:.4f} | {r['peak_rss_gb']:.2f} | {rel:.2f}× | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
