"""The short summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reinforge.config.schema import ReinforgeConfig
from reinforge.data.tokenize import TokenizeStats

KEYS = ("loss", "rewards/accuracies", "rewards/margins", "reward", "ebft/cfm_loss", "ebft/ce_loss")


def print_summary(cfg: ReinforgeConfig, history: list[dict[str, Any]], stats: TokenizeStats, out_dir: Path,
                  report: Path | None = None) -> dict[str, Any]:
    """Print first/last train metrics (and the means of the first and last 10 steps, from 20 steps on), eval
    before/after, data counts, the output path and the report's
    index.html (`report`, when written); return them."""
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    # the last step logged (a step whose micro-batches were all skipped, zero advantages, logs no loss)
    steps = max((h["step"] for h in history if not any(k.startswith("eval_") for k in h)), default=0)
    summary: dict[str, Any] = {"steps": steps, "output_dir": str(out_dir)}
    lines = [f"reinforge {cfg.rl}: {summary['steps']} steps → {out_dir}"]
    for key in KEYS:
        having = [h for h in train if key in h]
        if having:
            summary[f"first_{key}"], summary[f"last_{key}"] = having[0][key], having[-1][key]
            line = f"  train {key:<20} first {having[0][key]:.4f}  last {having[-1][key]:.4f}"
            if len(having) >= 20:  # single steps are noisy (a new prompt or document each): means of 10 too
                head, tail = (sum(h[key] for h in part) / 10 for part in (having[:10], having[-10:]))
                summary[f"first10_mean_{key}"], summary[f"last10_mean_{key}"] = head, tail
                line += f"  (mean of the first 10 steps {head:.4f}, of the last 10 {tail:.4f})"
            lines.append(line)
        ek = f"eval_{key}"
        if evals and ek in evals[0]:
            summary[f"eval_before_{key}"], summary[f"eval_after_{key}"] = evals[0][ek], evals[-1][ek]
            lines.append(f"  eval  {key:<20} before {evals[0][ek]:.4f}  after {evals[-1][ek]:.4f}")
    lines.append(f"  data: {stats.rows_in} rows in, {stats.rows_out} used, {stats.truncated} truncated, "
                 f"{stats.dropped_too_long + stats.dropped_no_completion} dropped")
    if report is not None:
        summary["report"] = str(report)
        lines.append(f"  report: {report}")
    print("\n".join(lines), flush=True)
    return summary
