"""From `datasets:` config to tokenised train/eval rows, with a report of what happened to every row."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from reinforge.config.schema import DatasetConfig, ReinforgeConfig
from reinforge.data.errors import DataError, RowError
from reinforge.data.formats import Format, get_format
from reinforge.data.sources import load_source
from reinforge.data.tokenize import TokenizeStats, tokenize_record

log = logging.getLogger(__name__)

KIND_OF_METHOD = {
    "dpo": "paired", "ipo": "paired", "orpo": "paired", "simpo": "paired",
    "kto": "unpaired", "grpo": "prompt", "gdpo": "prompt", "ebft": "prompt",
}


@dataclass
class PreparedData:
    """Tokenised rows ready for a collator, plus the counts of what preparation did."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: TokenizeStats
    kind: str


def resolve_format(ds: DatasetConfig, kind: str, first_row: dict[str, Any]) -> Format:
    """The format for a dataset entry: its `type:`, or detected from the first row when unset."""
    if ds.type is None:
        from reinforge.data.formats import detect

        fmt = detect(first_row, kind)
        log.info("%s: no `type:` given; detected format `%s`", ds.path, fmt.name)
        return fmt
    if isinstance(ds.type, dict):
        return get_format("user_defined", kind)
    return get_format(ds.type, kind)


def format_rows(ds: DatasetConfig, kind: str) -> tuple[list[dict[str, Any]], Format]:
    """Load one dataset entry and turn every row into a canonical record.

    Raises:
        DataError: naming the dataset, row index, field, expected format and an example record.
    """
    data = load_source(ds)
    fmt = resolve_format(ds, kind, data[0])
    records = []
    for i, row in enumerate(data):
        try:
            records.append(fmt.fn(row, ds))
        except RowError as exc:
            raise DataError(ds.path, i, exc.field, exc.problem, fmt.name, fmt.example) from None
    return records, fmt


def tokenize_records(records: list[dict[str, Any]], kind: str, tokenizer, cfg: ReinforgeConfig,
                     source: str, chat_kwargs: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenise canonical records; dropped rows are counted in the returned stats."""
    stats = TokenizeStats()
    rows = []
    for i, rec in enumerate(records):
        try:
            out = tokenize_record(rec, kind, tokenizer, cfg.sequence_len, cfg.excess_length_strategy,
                                  cfg.truncation_mode, stats, chat_kwargs)
        except RowError as exc:
            raise DataError(source, i, exc.field, exc.problem) from None
        if out is not None:
            rows.append({**rec, **out} if kind == "prompt" else out)
    return rows, stats


def split_eval(rows: list[Any], val_set_size: float, seed: int) -> tuple[list[Any], list[Any] | None]:
    """Hold out `val_set_size` rows (a fraction in (0,1) or a count), chosen with `seed`."""
    if val_set_size <= 0:
        return rows, None
    n_eval = int(val_set_size) if val_set_size >= 1 else max(1, round(len(rows) * val_set_size))
    if n_eval >= len(rows):
        raise ValueError(f"val_set_size={val_set_size} leaves no training rows (of {len(rows)})")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def prepare_data(cfg: ReinforgeConfig, tokenizer) -> PreparedData:
    """Load, format, tokenise and split every dataset of `cfg` for its method."""
    kind = KIND_OF_METHOD[cfg.rl]
    stats = TokenizeStats()
    chat_kwargs = cfg.trl.chat_template_kwargs

    def load(entries: list[DatasetConfig]) -> list[dict[str, Any]]:
        out = []
        for ds in entries:
            records, _ = format_rows(ds, kind)
            rows, st = tokenize_records(records, kind, tokenizer, cfg, ds.path, chat_kwargs)
            stats.merge(st)
            out.extend(rows)
        return out

    train = load(cfg.datasets)
    if cfg.shuffle_merged_datasets and len(cfg.datasets) > 1:
        random.Random(cfg.seed).shuffle(train)
    if cfg.test_datasets:
        eval_rows = load(cfg.test_datasets)
    else:
        train, eval_rows = split_eval(train, cfg.val_set_size, cfg.seed)
    if not train:
        raise DataError(", ".join(d.path for d in cfg.datasets), None, None, "no training rows left after preparation")
    return PreparedData(train, eval_rows, stats, kind)
