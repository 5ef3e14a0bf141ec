"""`reinforge preprocess CONFIG`: prepare (and cache) the data, print what happened, show examples.

The examples are rendered from the tokenised rows through the training collator, so what is marked
as trained is exactly what the loss sees: ⟦ … ⟧ encloses the tokens that carry a loss target
(prompt tokens never do). With `tokens=True` every token is shown, separated by `│`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from reinforge.config.schema import ReinforgeConfig
from reinforge.data.prepare import PreparedData, prepare_data

OPEN, CLOSE, SEP = "⟦", "⟧", "│"


def trained_mask(row: dict[str, Any], kind: str, pad_id: int) -> dict[str, tuple[list[int], list[bool]]]:
    """For each scored sequence of a tokenised row: (token ids, whether each token is a loss target).

    Uses `PairedCollator`/`UnpairedCollator`: position p predicts token p+1, so token t is trained when
    `targets[t-1]` is set. paired → {"chosen", "rejected"}; unpaired → {"completion"}; prompt → {"prompt"}
    (nothing trained: completions are generated during training).
    """
    from reinforge.data.collate import IGNORE, PairedCollator, UnpairedCollator

    if kind == "prompt":
        ids = list(row["prompt_ids"])
        return {"prompt": (ids, [False] * len(ids))}
    if kind == "paired":
        batch = PairedCollator(pad_id)([row])
        names = ["chosen", "rejected"]
    else:
        batch = UnpairedCollator(pad_id)([row])
        names = ["completion"]
    out = {}
    for r, name in enumerate(names):
        n = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r, :n].tolist()
        targets = batch["targets"][r, :n].tolist()
        out[name] = (ids, [False] + [t != IGNORE for t in targets[: n - 1]])
    return out


def _clip(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} … [{len(text) - 2 * half} characters not shown] … {text[-half:]}"


def mark(tokenizer, ids: list[int], trained: list[bool], tokens: bool = False, max_chars: int = 0) -> str:
    """Text of `ids` with the trained runs enclosed in ⟦ ⟧ (each token separated by │ when `tokens`)."""
    if tokens:
        parts = [tokenizer.decode([i]) for i in ids]
        return SEP.join(f"{OPEN}{p}{CLOSE}" if t else p for p, t in zip(parts, trained))
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i])
            out.append(f"{OPEN}{_clip(text, max_chars)}{CLOSE}" if trained[start] else _clip(text, max_chars))
            start = i
    return "".join(out)


def render_example(tokenizer, row: dict[str, Any], kind: str, title: str, tokens: bool = False,
                   max_chars: int = 1200) -> str:
    """One tokenised row as readable text: counts, the prompt once, then each response, trained tokens marked.

    The marks come from the collated sequences (prompt + response); the prompt is shown from the first
    sequence, the responses from the tokens after it.
    """
    seqs = trained_mask(row, kind, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    n_prompt = len(row["prompt_ids"])
    counts = [f"prompt {n_prompt} tokens (not trained)"]
    for name, (ids, tr) in seqs.items():
        if kind != "prompt":
            counts.append(f"{name} {sum(tr)} trained of {len(ids) - n_prompt}")
    if kind == "unpaired":
        counts.append(f"label {'desirable' if row['label'] else 'undesirable'}")
    lines = [f"── {title} ──", "   " + " · ".join(counts)]
    first_ids, first_mask = next(iter(seqs.values()))
    lines.append("[prompt]" if kind != "prompt" else "[prompt as the model sees it before generating]")
    lines.append(mark(tokenizer, first_ids[:n_prompt], first_mask[:n_prompt], tokens, max_chars))
    if kind != "prompt":
        for name, (ids, tr) in seqs.items():
            lines.append(f"[{name}]")
            lines.append(mark(tokenizer, ids[n_prompt:], tr[n_prompt:], tokens, max_chars))
    else:
        extra = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}
        for k, v in extra.items():
            lines.append(f"[column {k}] {_clip(str(v), 300)}")
    return "\n".join(lines)


def format_report(cfg: ReinforgeConfig, data: PreparedData) -> str:
    """Counts per dataset, notes, the train/eval split and token-length percentiles, as text."""
    s = data.stats
    where = (f"served from the cache in {data.seconds:.2f}s ({data.cache_path})" if data.from_cache
             else f"prepared in {data.seconds:.2f}s" + (f"; cached at {data.cache_path}" if data.cache_path else ""))
    lines = [f"rl: {cfg.rl} ({data.kind} rows) — {where}", "", "datasets:"]
    for src in data.sources:
        lines.append(f"  {src['name']}  [{src['role']}]  format {src['format']}")
        lines.append(f"    {src['rows_in']} rows → {src['records']} records → {src['rows_out']} kept; "
                     f"{src['truncated']} truncated; dropped: {src['dropped_too_long']} too long, "
                     f"{src['dropped_no_completion']} no room for a completion, {src['duplicates']} duplicates")
        extras = [f"{src[k]} {label}" for k, label in (("boundary_merges", "boundary merges"),
                                                        ("eos_appended", "EOS appended"),
                                                        ("double_bos_removed", "double BOS removed"),
                                                        ("prompts_over_max_length", "prompts over trl.max_prompt_length"))
                  if src.get(k)]
        if extras:
            lines.append("    " + ", ".join(extras))
        for note, n in src["notes"].items():
            lines.append(f"    note: {n} row(s): {note.split(': ', 1)[-1]}")
    eval_from = ("test_datasets" if cfg.test_datasets else f"val_set_size {cfg.val_set_size:g}" if data.eval else "none")
    lines += ["", f"total: {s.rows_in} rows in, {s.rows_out} kept ({s.truncated} truncated, {s.dropped} dropped) → "
                  f"{len(data.train)} train, {len(data.eval or [])} eval (eval from {eval_from})"]
    if data.kind != "prompt":
        lines.append(f"length: sequence_len {cfg.sequence_len}, excess_length_strategy {cfg.excess_length_strategy}, "
                     f"truncation_mode {cfg.truncation_mode}")
        if s.records and s.dropped_no_completion / s.records >= 0.1:
            lines.append(f"hint: {s.dropped_no_completion} of {s.records} rows ({100 * s.dropped_no_completion / s.records:.0f}%) "
                         f"were dropped because their prompt alone fills sequence_len under truncation_mode keep_start; "
                         f"truncation_mode: keep_end keeps them (the prompt loses its beginning), or raise sequence_len")
        if s.records and s.dropped_too_long / s.records >= 0.1:
            lines.append(f"hint: {s.dropped_too_long} of {s.records} rows ({100 * s.dropped_too_long / s.records:.0f}%) "
                         f"were dropped as too long (excess_length_strategy: drop); consider truncate or a larger sequence_len")
    pct = s.percentiles()
    if pct:
        cols = ["min", "p50", "p90", "p95", "p99", "max", "mean"]
        lines += ["", "token lengths of kept rows:", f"  {'':<12}" + "".join(f"{c:>8}" for c in cols)]
        for name, row in pct.items():
            lines.append(f"  {name:<12}" + "".join(f"{row[c]:>8.1f}" if c == "mean" else f"{int(row[c]):>8d}" for c in cols))
    return "\n".join(lines)


def preprocess(cfg: ReinforgeConfig, examples: int = 3, tokens: bool = False, rebuild: bool = False,
               max_chars: int = 1200, out=None) -> int:
    """Prepare and cache the data of `cfg`, print the report and `examples` rendered rows; returns 0.

    Raises:
        DataError: bad data (see `prepare_data`).
        OSError / ValueError: the tokenizer or chat template cannot be loaded.
    """
    out = out or sys.stdout
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # progress bars are cosmetic
        pass
    from reinforge.models.loading import load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer, rebuild=rebuild)
    print(format_report(cfg, data), file=out)
    n = min(examples, len(data.train))
    for i in range(n):
        src, row_idx = data.train_origin[i] if data.train_origin else (None, None)
        origin = f"{data.sources[src]['name']} row {row_idx}" if src is not None else "?"
        title = f"example {i + 1} of {n} · {origin}"
        print("\n" + render_example(tokenizer, data.train[i], data.kind, title, tokens, max_chars), file=out)
    if n:
        print(f"\n{OPEN} {CLOSE} encloses the tokens that are trained (carry a loss target).", file=out)
    print(f"\ndone in {time.perf_counter() - t0:.2f}s (data {'from the cache' if data.from_cache else 'prepared'} "
          f"in {data.seconds:.2f}s)", file=out)
    return 0
