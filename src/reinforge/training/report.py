"""`OUTPUT_DIR/report/`: PNG plots of a run's curves (from `metrics.jsonl`) and an `index.html` that shows them
with the run's summary and its resolved config.

Written at the end of every `reinforge train` run, when a run is interrupted (with its checkpoint) or stopped by
an error after some steps (`RunControl`), and by `reinforge report OUTPUT_DIR`. Curves are grouped into figures
by what they mean (`FIGURES`); an `eval_<name>` curve is drawn, dashed, on the panel of `<name>`; every numeric
metric that no figure claims goes into a last grid ("other metrics"), so nothing logged is left out.
Plotting uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPORT_DIR = "report"
FIG_WIDTH_PX = 1200  # every PNG is this wide ...
ROW_HEIGHT_PX = 360  # ... and this tall per row of panels
DPI = 100


class ReportError(RuntimeError):
    """The report cannot be written (no metrics.jsonl, or no numeric metric in it)."""


@dataclass(frozen=True)
class Panel:
    """One axes: the metrics whose (eval-prefix-free) name `match` accepts, drawn as lines; with `split`, one
    axes per such metric (titled by its name), for families whose members have unrelated scales."""

    title: str
    match: Callable[[str], bool]
    split: bool = False


def _names(*names: str) -> Callable[[str], bool]:
    return lambda n: n in names


def _regex(pattern: str) -> Callable[[str], bool]:
    rx = re.compile(pattern)
    return lambda n: rx.fullmatch(n) is not None


# (file stem, figure title, panels). Order is the page's order; the first panel that accepts a metric takes it.
FIGURES: list[tuple[str, str, list[Panel]]] = [
    ("loss", "Loss", [Panel("loss", _names("loss"))]),
    ("preference_rewards", "Preference rewards (β-scaled log-ratio to the reference)",
     [Panel("rewards", _names("rewards/chosen", "rewards/rejected", "rewards/margins"))]),
    ("accuracies", "Accuracies", [Panel("accuracy", _regex(r"rewards/accuracies|\w*accuracy\w*"))]),
    ("reward", "GRPO reward and per-function means",
     [Panel("reward", _names("reward")), Panel("per reward function (mean)", _regex(r"rewards/[^/]+/mean"))]),
    ("reward_std", "Reward spread", [Panel("std", _regex(r"reward_std|rewards/[^/]+/std")),
                                     Panel("fraction of groups with zero reward std", _names("frac_reward_zero_std"))]),
    ("completion_lengths", "Completion lengths (tokens)", [Panel("length", _regex(r"completions/\w*length")),
                                                           Panel("clipped ratio", _names("completions/clipped_ratio"))]),
    ("kl", "KL to the reference", [Panel("kl", _names("kl"))]),
    ("entropy", "Entropy (nats per token)", [Panel("entropy", _names("entropy"))]),
    ("log_probs", "Log-probabilities and logits", [Panel("log-probs", _regex(r"logps/.*")),
                                                  Panel("logits", _regex(r"logits/.*"))]),
    ("optimisation", "Learning rate and gradient norm",
     [Panel("learning_rate", _names("learning_rate")), Panel("grad_norm", _names("grad_norm"))]),
    ("clip_ratio", "Clipped ratios", [Panel("clip ratio", _regex(r"clip_ratio/.*"))]),
    ("ebft", "EBFT", [Panel("ebft", _regex(r"ebft/.*"), split=True)]),
    ("sampling", "Asynchronous / off-policy sampling", [Panel("staleness", _regex(r"sample/staleness.*")),
                                                        Panel("sampling", _regex(r"sampling/.*|sample/.*"))]),
    ("time", "Time and throughput", [Panel("seconds", _regex(r"time/.*|step_time")),
                                     Panel("tokens per second", _names("tokens_per_second"))]),
]
SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "reward",
                "reward_std", "kl", "entropy", "completions/mean_length", "grad_norm")


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `out_dir/metrics.jsonl` (a torn last line, as after a crash, is ignored).

    Raises:
        ReportError: no metrics.jsonl, or no record in it.
    """
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"no metrics.jsonl in {out_dir} (is it a reinforge output_dir of a run that logged a step?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    if not records:
        raise ReportError(f"{path} has no metric records")
    return records


def series(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{metric name: (steps, values)} of every finite numeric metric (booleans and strings left out)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(rec["step"])
            ys.append(float(value))
    return out


def group(names: list[str]) -> list[tuple[str, str, list[tuple[str, list[str]]]]]:
    """Assign metric names to figures: [(file stem, title, [(panel title, [names])])], panels without metrics
    and figures without panels left out; the names no figure claims make the last figure, one panel each."""
    taken: set[str] = set()
    figures = []
    for stem, title, panels in FIGURES:
        filled = []
        for panel in panels:
            mine = [n for n in names if n not in taken and panel.match(n.removeprefix("eval_"))]
            taken.update(mine)
            mine.sort(key=lambda n: n.startswith("eval_"))  # training curves first, then their evaluations
            if panel.split:
                bases = list(dict.fromkeys(n.removeprefix("eval_") for n in mine))
                filled += [(b, [n for n in mine if n.removeprefix("eval_") == b]) for b in bases]
            elif mine:
                filled.append((panel.title, mine))
        if filled:
            figures.append((stem, title, filled))
    rest = [n for n in names if n not in taken]
    if rest:
        figures.append(("other", "Other metrics", [(n, [n]) for n in rest]))
    return figures


def _layout(n_panels: int) -> tuple[int, int]:
    cols = 1 if n_panels == 1 else 2 if n_panels <= 4 else 3
    return cols, math.ceil(n_panels / cols)


def figure_size_px(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of a figure with `n_panels` panels."""
    _, rows = _layout(n_panels)
    return FIG_WIDTH_PX, ROW_HEIGHT_PX * rows


def _plot(path: Path, title: str, panels: list[tuple[str, list[str]]], data: dict[str, tuple[list, list]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols, rows = _layout(len(panels))
    width, height = figure_size_px(len(panels))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    palette = [f"C{i}" for i in range(10)]
    for ax, (panel_title, names) in zip(axes, panels):
        bases = list(dict.fromkeys(n.removeprefix("eval_") for n in names))
        for name in names:
            base = name.removeprefix("eval_")
            xs, ys = data[name]
            is_eval = name.startswith("eval_")
            ax.plot(xs, ys, color=palette[bases.index(base) % len(palette)], linestyle="--" if is_eval else "-",
                    marker="o" if is_eval or len(xs) <= 40 else None, markersize=4 if is_eval else 3, linewidth=1.6,
                    label=f"eval {base}" if is_eval else name)
        if len(panels) > 1 or path.stem == "other":  # a lone panel under its figure's own title needs none
            ax.set_title(panel_title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(names) > 1 or any(n.startswith("eval_") for n in names):
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=DPI, format="png")


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _summary_rows(records: list[dict[str, Any]], data: dict[str, tuple[list, list]]) -> list[tuple[str, ...]]:
    rows = []
    for key in SUMMARY_KEYS:
        if key in data:
            (xs, ys) = data[key]
            rows.append(("train", key, _fmt(ys[0]), _fmt(ys[-1]), _fmt(min(ys)), _fmt(max(ys)), f"{xs[0]}–{xs[-1]}"))
        if f"eval_{key}" in data:
            (xs, ys) = data[f"eval_{key}"]
            rows.append(("eval", key, _fmt(ys[0]), _fmt(ys[-1]), _fmt(min(ys)), _fmt(max(ys)),
                         ", ".join(str(x) for x in xs) if len(xs) <= 6 else f"{xs[0]}–{xs[-1]} ({len(xs)} evals)"))
    return rows


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1240px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;display:block;
margin:.5em 0 2em;border:1px solid #ddd}pre{background:#f7f7f7;padding:1em;overflow:auto;border:1px solid #ddd}
nav a{margin-right:1em}"""


def write_report(out_dir: str | Path, status: str | None = None) -> Path:
    """(Re)write `out_dir/report/`: one PNG per figure and `index.html`; returns the path of index.html.

    Args:
        out_dir: a run's output_dir (metrics.jsonl; reinforge_config.yaml and run_info.jsonl when present).
        status: how the run ended, shown on the page (e.g. "finished", "interrupted after step 5").
    The new report is built beside the old one and then replaces it, so a stale PNG never remains.
    Raises:
        ReportError: no metrics (see `read_metrics`); matplotlib's own errors propagate.
    """
    out = Path(out_dir)
    records = read_metrics(out)
    data = series(records)
    if not data:
        raise ReportError(f"{out / 'metrics.jsonl'} has no numeric metric")
    tmp = out / f".{REPORT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    figures = group(list(data))
    for stem, title, panels in figures:
        _plot(tmp / f"{stem}.png", title, panels, data)
    (tmp / "index.html").write_text(_html(out, records, data, figures, status))
    final = out / REPORT_DIR
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final / "index.html"


def _html(out: Path, records: list[dict[str, Any]], data: dict, figures: list, status: str | None) -> str:
    e = html.escape
    cfg_file = out / "reinforge_config.yaml"
    cfg_text = cfg_file.read_text() if cfg_file.is_file() else None
    rl = "?"
    if cfg_text:
        import yaml

        try:
            rl = str((yaml.safe_load(cfg_text) or {}).get("rl", "?"))
        except yaml.YAMLError:
            pass
    events = []
    info_file = out / "run_info.jsonl"
    if info_file.is_file():
        for line in info_file.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    train_steps = [r["step"] for r in records if "loss" in r or "reward" in r]
    last_step = max(train_steps) if train_steps else max(r["step"] for r in records)
    facts = [("method (rl)", rl), ("steps", str(last_step)), ("logged records", str(len(records))),
             ("output_dir", str(out.resolve()))]
    if status:
        facts.insert(1, ("status", status))
    if events:
        facts.append(("started", str(events[0].get("time", "?"))))
        facts += [(f"resumed ({ev.get('time', '?')})", f"from step {ev.get('step', '?')}")
                  for ev in events if ev.get("event") == "resume"]
        facts.append(("processes", str(events[-1].get("world_size", "?"))))
        versions = events[-1].get("versions") or {}
        if versions:
            facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    facts.append(("report written", time.strftime("%Y-%m-%d %H:%M:%S")))
    p = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>reinforge {e(rl)} report — "
         f"{e(out.name)}</title><style>{_CSS}</style></head><body>",
         f"<h1>reinforge {e(rl)} run: {e(out.name)}</h1>",
         "<nav>" + "".join(f"<a href=\"#{e(stem)}\">{e(title)}</a>" for stem, title, _ in figures)
         + "<a href=\"#config\">config</a></nav>",
         "<h2>Summary</h2><table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts) + "</table>"]
    rows = _summary_rows(records, data)
    if rows:
        p.append("<table><tr><th></th><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
                 "<th>steps</th></tr>" + "".join(
                     "<tr>" + "".join((f"<td class=\"n\">{e(c)}</td>" if 2 <= i <= 5 else f"<td>{e(c)}</td>")
                                      for i, c in enumerate(r)) + "</tr>" for r in rows) + "</table>")
    p.append("<h2>Curves</h2><p>Solid lines: training steps; dashed with dots: evaluations (<code>eval_*</code>).</p>")
    for stem, title, panels in figures:
        names = ", ".join(n for _, ns in panels for n in ns)
        p.append(f"<h3 id=\"{e(stem)}\">{e(title)}</h3><img src=\"{e(stem)}.png\" alt=\"{e(title)}: {e(names)}\">")
    p.append("<h2 id=\"config\">Config</h2>")
    if cfg_text is None:
        p.append("<p>no reinforge_config.yaml in output_dir</p>")
    else:
        p.append(f"<p>resolved config (<code>reinforge_config.yaml</code>):</p><pre>{e(cfg_text)}</pre>")
    p.append("</body></html>\n")
    return "\n".join(p)


def try_write_report(out_dir: str | Path, status: str | None = None) -> Path | None:
    """`write_report`, but a failure (no metrics, matplotlib missing or failing, a full disk) prints one warning
    line to stderr and returns None: the report never turns a run's outcome into a failure."""
    try:
        return write_report(out_dir, status)
    except Exception as exc:  # noqa: BLE001 — said on stderr, the run's own outcome stands
        print(f"reinforge: warning: the report was not written: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        return None
