"""Precomputed reference log-probs: one no-grad pass over the data, cached on disk.

The cache key hashes the reference model (resolved path, and each weight file's name, size and mtime),
the tokenised rows, and the log-prob settings, so a later run or epoch with the same data and model
reuses the file; anything else computes anew. Only paired methods are supported (KTO's KL term pairs
completions across a batch, so its reference values depend on batch composition).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reinforge.models.loading import CACHE_DIR, resolve_model_path

log = logging.getLogger(__name__)
KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def model_fingerprint(path: str) -> str:
    """A string that changes when the model at `path` changes (files' names, sizes, mtimes)."""
    resolved = resolve_model_path(path)
    p = Path(resolved)
    if not p.is_dir():
        return resolved
    files = sorted(f for f in p.iterdir() if f.is_file())
    return resolved + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def cache_key(model_id: str, rows: list[dict[str, Any]], extra: str = "") -> str:
    """sha256 over the model fingerprint, the rows' token ids and `extra` settings."""
    h = hashlib.sha256(model_fingerprint(model_id).encode())
    h.update(extra.encode())
    for r in rows:
        h.update(json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]).encode())
    return h.hexdigest()[:24]


def attach_reference_logps(rows: list[dict[str, Any]], ref_module, collate, batch_size: int, key: str,
                           cache_dir: Path | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Rows with `ref_chosen_logps`/`ref_rejected_logps` added; from the cache file when it exists.

    Args:
        ref_module: a LogpsModel computing reference outputs (called under no_grad).
        collate: the paired collator; batch_size: pairs per forward.
        key: from `cache_key`.
    Returns:
        (rows, served_from_cache).
    """
    cache_dir = cache_dir or CACHE_DIR / "ref_logps"
    path = cache_dir / f"{key}.pt"
    if path.exists():
        values = torch.load(path)
        if values.shape == (len(rows), 2):
            log.info("reference log-probs of %d pairs read from %s", len(rows), path)
            return [{**r, KEYS[0]: float(v[0]), KEYS[1]: float(v[1])} for r, v in zip(rows, values.tolist())], True
    out = []
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collate)
    with torch.no_grad():
        for batch in tqdm(loader, desc="reference log-probs"):
            logps = ref_module(**batch, stats=())["logps"].double().cpu()
            B = batch["n_pairs"]
            out.append(torch.stack([logps[:B], logps[B:]], dim=1))
    values = torch.cat(out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(values, tmp)
    tmp.replace(path)  # atomic
    log.info("reference log-probs of %d pairs computed and cached in %s", len(rows), path)
    return [{**r, KEYS[0]: float(v[0]), KEYS[1]: float(v[1])} for r, v in zip(rows, values.tolist())], False
