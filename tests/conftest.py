"""Shared fixtures: tiny randomly-initialised Llama models built on the fly, with a real tokenizer.

The tokenizer is SmolLM2's (shipped in tests/assets/smollm2-tokenizer, Apache-2.0) so that chat
templates and tokenisation are real; the model is a 2-layer Llama with that vocabulary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "tests" / "assets" / "smollm2-tokenizer"
DATA_DIR = ROOT / "examples" / "data"
REAL_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared-data and reference-log-prob caches of the tests go to a throwaway directory, not ~/.cache.
os.environ.setdefault("REINFORGE_CACHE", tempfile.mkdtemp(prefix="reinforge-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_model(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a tiny random Llama (session-scoped; do not modify it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def real_model_dir() -> Path:
    if not (REAL_MODEL_DIR / "config.json").exists():
        pytest.fail(f"{REAL_MODEL_DIR} missing: run `make model` (make test does it)")
    return REAL_MODEL_DIR
