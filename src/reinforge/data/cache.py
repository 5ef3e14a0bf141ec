"""The prepared-dataset cache: tokenised rows stored under a hash of everything that produced them.

The key hashes (1) the contents of every local data file (Hub datasets: their `datasets`
fingerprint, which changes with the cached revision), (2) the source of `module.fn` transforms,
(3) the configuration that shapes rows (method kind, `datasets`/`test_datasets` entries, chat
template, `sequence_len`, length strategy, split and de-duplication settings, seed), (4) the
tokenizer (its serialised vocabulary/merges, chat template and special tokens), and (5) this cache
format, the reinforge version and the source code of the data pipeline. Any change gives a new
key; old entries are left in place.

Layout: `<dataset_prepared_path or $REINFORGE_CACHE/prepared>/<key>/data.pkl` (the rows and
counts) and `meta.json` (what the entry holds, for people). Written to a temporary directory and
renamed, so an interrupted write never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import reinforge

FORMAT_VERSION = 1

#: Config keys (top level) that change prepared rows; `trl.chat_template_kwargs` and
#: `trl.max_prompt_length` are added separately.
CONFIG_KEYS = ("datasets", "test_datasets", "chat_template", "chat_template_jinja", "sequence_len",
               "excess_length_strategy", "truncation_mode", "val_set_size", "shuffle_merged_datasets",
               "dataset_exact_deduplication", "seed")


def default_dir() -> Path:
    """`$REINFORGE_CACHE/prepared` (default `~/.cache/reinforge/prepared`)."""
    root = Path(os.environ.get("REINFORGE_CACHE", Path.home() / ".cache" / "reinforge"))
    return root / "prepared"


def cache_dir(cfg: Any) -> Path:
    """The cache directory for a config: `dataset_prepared_path`, else `default_dir()`."""
    return Path(cfg.dataset_prepared_path).expanduser() if cfg.dataset_prepared_path else default_dir()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides tokenisation: vocabulary/merges, normaliser, chat template, special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(repr(tokenizer("a")["input_ids"]).encode())  # special tokens the tokenizer adds by default
    return h.hexdigest()


def config_fingerprint(cfg: Any, kind: str) -> dict[str, Any]:
    """The config values that shape prepared rows (JSON-serialisable)."""
    dumped = cfg.model_dump(mode="json")
    out = {k: dumped.get(k) for k in CONFIG_KEYS}
    out["kind"] = kind
    out["trl.chat_template_kwargs"] = dumped.get("trl", {}).get("chat_template_kwargs")
    out["trl.max_prompt_length"] = dumped.get("trl", {}).get("max_prompt_length")
    return out


def code_fingerprint() -> str:
    """A hash of the source of the data pipeline (reinforge.data and the named chat templates), so that a
    changed pipeline never serves rows prepared by an older one."""
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py")) + [root.parent / "models" / "chat_templates.py"]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.relative_to(root.parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def make_key(cfg: Any, kind: str, tokenizer, data_fingerprints: list[str]) -> str:
    """The cache key (hex) of a preparation: see the module docstring for what it covers."""
    payload = {
        "format": FORMAT_VERSION,
        "reinforge": reinforge.__version__,
        "code": code_fingerprint(),
        "config": config_fingerprint(cfg, kind),
        "data": data_fingerprints,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(directory: Path, key: str) -> dict[str, Any] | None:
    """The stored payload for `key`, or None when absent or unreadable (a corrupt entry is removed)."""
    entry = directory / key
    data = entry / "data.pkl"
    if not data.is_file():
        return None
    try:
        with open(data, "rb") as fh:
            payload = pickle.load(fh)
    except Exception:  # a corrupt or foreign file: rebuild rather than fail
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        return None
    return payload


def save(directory: Path, key: str, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Store `payload` (pickled) and `meta` (JSON) under `key`; returns the entry directory.

    Safe when several processes (e.g. data-parallel ranks) write the same key at once: each writes
    its own temporary directory and renames it into place; an existing entry is moved aside first
    (readers that already opened it keep reading it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / key
    tmp = directory / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "data.pkl", "wb") as fh:
        pickle.dump({**payload, "format": FORMAT_VERSION}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    (tmp / "meta.json").write_text(json.dumps({**meta, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2,
                                              default=str))
    old = directory / f".{key}.old-{os.getpid()}"
    try:
        if entry.exists():
            os.replace(entry, old)
        os.replace(tmp, entry)
    except OSError:
        # another process put the same entry in place between our calls: keep theirs
        if not (entry / "data.pkl").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return entry
