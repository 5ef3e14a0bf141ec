"""From `datasets:` config to tokenised train/eval rows, with a report of what happened to every row.

Steps: load each source → turn each row into a canonical record with its format (`type:` or
detected) → drop exact duplicates (`dataset_exact_deduplication`) → tokenise (chat template, length
handling) → mix the training datasets (shuffled with `seed` when `shuffle_merged_datasets`) →
evaluation rows from `test_datasets` or `val_set_size`. Results are stored in the prepared-data
cache (see `reinforge.data.cache`), so a second run with the same data, config and tokenizer
loads them instead. Every removed or changed row is counted in `PreparedData.stats`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from reinforge.config.schema import DatasetConfig, ReinforgeConfig
from reinforge.data import cache
from reinforge.data.errors import DataError, RowError
from reinforge.data.formats import Format, check_record, detect, get_format, resolve
from reinforge.data.formats.transform import TransformError
from reinforge.data.sources import fingerprint, load_source, source_name
from reinforge.algorithms.registry import METHODS
from reinforge.data.tokenize import RecordError, TokenizeStats, tokenize_records

log = logging.getLogger(__name__)

KIND_OF_METHOD = {name: spec.data for name, spec in METHODS.items()}


@dataclass
class PreparedData:
    """Tokenised rows ready for a collator, plus the counts of what preparation did.

    `train_origin[i]` / `eval_origin[i]` = (index into `sources`, row index in that source) of row i;
    `sources` describes each dataset entry (name, split role, format, counts, notes).
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: TokenizeStats
    kind: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    train_origin: list[tuple[int, int]] = field(default_factory=list)
    eval_origin: list[tuple[int, int]] | None = None
    from_cache: bool = False
    cache_path: str | None = None
    seconds: float = 0.0


def resolve_format(ds: DatasetConfig, kind: str, first_row: dict[str, Any], cfg: ReinforgeConfig | None = None,
                   dataset_idx: int = 0, tokenizer=None) -> Format:
    """The format for a dataset entry: its `type:`, or detected from the first row when unset.

    Raises:
        DataError: unknown `type:` (with the closest names and an example of the closest format),
            a bad `type:` mapping, or an untyped dataset whose layout is not recognised.
    """
    name = source_name(ds)
    if ds.type is None:
        try:
            fmt = detect(first_row, kind)
        except ValueError as exc:
            raise DataError(name, 0, None, str(exc)) from None
        log.info("%s: no `type:` given; detected format `%s`", name, fmt.name)
        return fmt
    return resolve_type(ds, kind, cfg, dataset_idx, tokenizer)


def resolve_type(ds: DatasetConfig, kind: str, cfg: ReinforgeConfig | None = None, dataset_idx: int = 0,
                 tokenizer=None) -> Format:
    """The format named by a dataset entry's `type:` (registered name, dict or `module.fn`), checked against
    the entry's options; needs no data (`reinforge validate` calls it too). A `module.fn` factory is called.

    Raises:
        DataError: unknown `type:` (with the closest names and an example of the closest format), a bad
            `type:` mapping, or a `module.fn` that is missing or whose factory fails.
    """
    name = source_name(ds)
    try:
        fmt = resolve(ds, kind, cfg, dataset_idx, tokenizer)
        check = getattr(fmt.fn, "check_config", None)
        if check is not None:
            check(ds, kind)
        return fmt
    except DataError:
        raise
    except Exception as exc:  # unknown names, bad mappings, errors in a user's transform factory
        from reinforge.data.formats import closest

        label = ds.type if isinstance(ds.type, str) else "user_defined"
        near = closest(label, kind) if isinstance(ds.type, str) else [label]
        example_fmt = None
        if near:
            try:
                example_fmt = get_format(near[0], kind)
            except ValueError:
                example_fmt = None
        raise DataError(name, None, "type", f"{exc}" if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}",
                        example_fmt.name if example_fmt else None,
                        example_fmt.example if example_fmt else None) from None


def format_rows(ds: DatasetConfig, kind: str, cfg: ReinforgeConfig | None = None, dataset_idx: int = 0, tokenizer=None,
                data=None, stats: TokenizeStats | None = None) -> tuple[list[dict[str, Any]], Format, list[int]]:
    """Load one dataset entry (unless `data` is given) and turn every row into canonical records.

    Returns (records, format, row index of each record). Notes that formats attach (`_note`) are
    counted in `stats.notes`.

    Raises:
        DataError: naming the dataset, row index, field, expected format and an example record.
    """
    name = source_name(ds)
    try:
        if data is None:
            data = load_source(ds)
        rows = data.to_list() if hasattr(data, "to_list") else list(data)
        if not rows:
            raise DataError(name, None, "split", f"split `{ds.split}` is empty")
    except DataError as exc:
        if exc.field == "split" and isinstance(ds.type, str):  # add what the rows should have looked like
            try:
                fmt = get_format(ds.type, kind)
            except ValueError:
                raise exc from None
            raise DataError(exc.dataset, None, "split", str(exc).split(": ", 1)[-1], fmt.name, fmt.example) from None
        raise
    fmt = resolve_format(ds, kind, rows[0], cfg, dataset_idx, tokenizer)
    records: list[dict[str, Any]] = []
    index: list[int] = []
    for i, row in enumerate(rows):
        try:
            out = fmt.fn(row, ds)
            for rec in out if isinstance(out, list) else [out]:
                note = rec.pop("_note", None) if isinstance(rec, dict) else None
                if note and stats is not None:
                    stats.note(f"{name}: {note}")
                records.append(check_record(rec, kind))
                index.append(i)
        except TransformError as exc:  # the user's code raised: one line (the traceback with --debug)
            err = DataError(name, i, None if exc.field == "transform" else exc.field, exc.what,
                            columns=sorted(map(str, row)) if isinstance(row, dict) else None)
            err.detail = exc.detail
            raise err from None
        except RowError as exc:
            raise DataError(name, i, exc.field, exc.problem, fmt.name, fmt.example or None,
                            columns=sorted(map(str, row)) if isinstance(row, dict) else None) from None
        except Exception as exc:  # a row the format did not anticipate: still name the dataset and row
            raise DataError(name, i, None, f"format `{fmt.name}` failed: {type(exc).__name__}: {exc}", fmt.name,
                            fmt.example or None, columns=sorted(map(str, row)) if isinstance(row, dict) else None) from exc
    if stats is not None:
        stats.rows_in += len(rows)
        stats.records += len(records)
    return records, fmt, index


def _record_key(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str)


def deduplicate(records: list[dict[str, Any]], seen: set[str]) -> list[int]:
    """Indices of records not seen before (in `seen` or earlier in `records`); `seen` is updated."""
    keep = []
    for i, rec in enumerate(records):
        key = _record_key(rec)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def split_eval(rows: list[Any], val_set_size: float, seed: int) -> tuple[list[Any], list[Any] | None]:
    """Hold out `val_set_size` rows (a fraction in (0,1) or a count), chosen with `seed`."""
    train_idx, eval_idx = split_eval_indices(len(rows), val_set_size, seed)
    if eval_idx is None:
        return rows, None
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def split_eval_indices(n: int, val_set_size: float, seed: int) -> tuple[list[int], list[int] | None]:
    """Indices of the training and held-out rows for `split_eval`.

    Raises:
        ValueError: the hold-out leaves no training rows.
    """
    if val_set_size <= 0:
        return list(range(n)), None
    n_eval = int(val_set_size) if val_set_size >= 1 else max(1, round(n * val_set_size))
    if n_eval >= n:
        raise ValueError(f"val_set_size={val_set_size} leaves no training rows (of {n})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def _chat_kwargs(cfg: ReinforgeConfig, ds: DatasetConfig, tokenizer) -> dict[str, Any]:
    kwargs = dict(cfg.trl.chat_template_kwargs or {})
    if ds.chat_template:
        from reinforge.models.chat_templates import resolve_chat_template

        template = resolve_chat_template(ds.chat_template, cfg.chat_template_jinja, tokenizer)
        if template is not None:
            kwargs["chat_template"] = template
    return kwargs


def _data_fingerprints(cfg: ReinforgeConfig, entries: list[tuple[str, int, DatasetConfig]]) -> tuple[list[str], dict]:
    """Fingerprints of every source (and `module.fn` transform file); Hub datasets are loaded for theirs."""
    from reinforge.data.formats import available
    from reinforge.data.formats.transform import find_module

    kind = KIND_OF_METHOD[cfg.rl]
    loaded: dict[tuple[str, int], Any] = {}
    fps = []
    for role, i, ds in entries:
        fp = fingerprint(ds)
        if fp is None:
            data = load_source(ds)
            loaded[(role, i)] = data
            fp = f"hub:{getattr(data, '_fingerprint', '')}"
        fps.append(fp)
        t = ds.type
        if isinstance(t, str) and "." in t and t not in available(kind) and f"{t}.default" not in available(kind):
            try:
                module = find_module(t.rsplit(".", 1)[0])
            except Exception:  # reported when the format is resolved
                module = None
            if module is not None and getattr(module, "__file__", None):
                fps.append(f"transform:{t}:{cache.file_fingerprint(module.__file__)}")
    return fps, loaded


def prepare_data(cfg: ReinforgeConfig, tokenizer, use_cache: bool = True, rebuild: bool = False) -> PreparedData:
    """Load, format, tokenise and split every dataset of `cfg` for its method (cached; see module docstring).

    Args:
        use_cache: read and write the prepared-data cache.
        rebuild: ignore a cached entry (it is replaced).
    Raises:
        DataError: bad input (dataset, row, field, expected format and an example are named), an
            empty split, or no training rows left.
    """
    t0 = time.perf_counter()
    kind = KIND_OF_METHOD[cfg.rl]
    entries = [("train", i, ds) for i, ds in enumerate(cfg.datasets)]
    entries += [("test", i, ds) for i, ds in enumerate(cfg.test_datasets or [])]
    fps, loaded = _data_fingerprints(cfg, entries)
    key = cache.make_key(cfg, kind, tokenizer, fps)
    directory = cache.cache_dir(cfg)
    if use_cache and not rebuild:
        hit = cache.load(directory, key)
        if hit is not None:
            data = PreparedData(hit["train"], hit["eval"], hit["stats"], kind, hit["sources"], hit["train_origin"],
                                hit["eval_origin"], from_cache=True, cache_path=str(directory / key),
                                seconds=time.perf_counter() - t0)
            log.info("prepared data loaded from the cache %s (%d train, %d eval rows) in %.2fs", data.cache_path,
                     len(data.train), len(data.eval or []), data.seconds)
            return data

    stats = TokenizeStats()
    sources: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {"train": set(), "test": set()}
    per_role: dict[str, tuple[list[dict[str, Any]], list[tuple[int, int]]]] = {"train": ([], []), "test": ([], [])}
    for role, i, ds in entries:
        st = TokenizeStats()
        records, fmt, index = format_rows(ds, kind, cfg, i, tokenizer, loaded.get((role, i)), st)
        name = source_name(ds)
        if cfg.dataset_exact_deduplication:
            keep = deduplicate(records, seen[role] if role == "train" else seen["test"])
            if role == "test":  # evaluation rows that also appear in the training data are removed too
                keep = [j for j in keep if _record_key(records[j]) not in seen["train"]]
            st.duplicates += len(records) - len(keep)
            records, index = [records[j] for j in keep], [index[j] for j in keep]
        try:
            rows = tokenize_records(records, kind, tokenizer, cfg.sequence_len, cfg.excess_length_strategy,
                                    cfg.truncation_mode, st, _chat_kwargs(cfg, ds, tokenizer), cfg.trl.max_prompt_length)
        except RecordError as exc:
            raise DataError(name, index[exc.index], exc.field, exc.problem, fmt.name, fmt.example or None) from None
        except ValueError as exc:  # a per-dataset chat_template that cannot be resolved
            raise DataError(name, None, "chat_template", str(exc)) from None
        src = len(sources)
        out_rows, origins = per_role[role]
        for rec, tok, row_idx in zip(records, rows, index):
            if tok is None:
                continue
            out_rows.append({**rec, **tok} if kind == "prompt" else tok)
            origins.append((src, row_idx))
        sources.append({"name": name, "role": role, "format": fmt.name, **st.to_dict()})
        stats.merge(st)
        _log_source(name, role, fmt.name, st)

    train, train_origin = per_role["train"]
    if cfg.shuffle_merged_datasets and len(cfg.datasets) > 1:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        train, train_origin = [train[j] for j in order], [train_origin[j] for j in order]
    if cfg.test_datasets:
        eval_rows, eval_origin = per_role["test"]
        if not eval_rows:
            raise DataError(", ".join(source_name(d) for d in cfg.test_datasets), None, None,
                            "no evaluation rows left after preparation")
    else:
        try:
            tr, ev = split_eval_indices(len(train), cfg.val_set_size, cfg.seed)
        except ValueError as exc:
            raise DataError(", ".join(source_name(d) for d in cfg.datasets), None, "val_set_size", str(exc)) from None
        eval_rows = [train[j] for j in ev] if ev is not None else None
        eval_origin = [train_origin[j] for j in ev] if ev is not None else None
        train, train_origin = [train[j] for j in tr], [train_origin[j] for j in tr]
    if not train:
        raise DataError(", ".join(source_name(d) for d in cfg.datasets), None, None,
                        f"no training rows left after preparation ({stats.rows_in} rows in, "
                        f"{stats.dropped_too_long} too long, {stats.dropped_no_completion} without room for a "
                        f"completion, {stats.duplicates} duplicates; sequence_len={cfg.sequence_len})")
    data = PreparedData(train, eval_rows, stats, kind, sources, train_origin, eval_origin,
                        seconds=time.perf_counter() - t0)
    if use_cache:
        entry = cache.save(directory, key, {"train": train, "eval": eval_rows, "stats": stats, "sources": sources,
                                            "train_origin": train_origin, "eval_origin": eval_origin},
                           {"kind": kind, "rl": cfg.rl, "train_rows": len(train), "eval_rows": len(eval_rows or []),
                            "sources": sources, "config": cache.config_fingerprint(cfg, kind)})
        data.cache_path = str(entry)
    log.info("prepared %d train and %d eval rows in %.2fs (%d rows in, %d truncated, %d dropped)%s", len(train),
             len(eval_rows or []), data.seconds, stats.rows_in, stats.truncated, stats.dropped,
             f"; cached at {data.cache_path}" if data.cache_path else "")
    return data


def _log_source(name: str, role: str, fmt: str, st: TokenizeStats) -> None:
    log.info("%s (%s): format %s; %d rows → %d records, %d kept, %d truncated, %d dropped (%d too long, "
             "%d no room for a completion, %d duplicates)", name, role, fmt, st.rows_in, st.records, st.rows_out,
             st.truncated, st.dropped, st.dropped_too_long, st.dropped_no_completion, st.duplicates)
    for note, n in st.notes.items():
        log.warning("%s: %d row(s): %s", name, n, note.split(": ", 1)[-1])
    if st.boundary_merges:
        log.warning("%s: %d row(s) where tokens merge across the prompt/completion boundary (or the template renders "
                    "the prompt differently); the completion starts where they diverge", name, st.boundary_merges)
    if st.double_bos_removed:
        log.warning("%s: %d sequence(s) started with two BOS tokens; one was removed", name, st.double_bos_removed)
