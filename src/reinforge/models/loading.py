"""Load the tokenizer, the policy (full or LoRA) and the reference; de-quantise GGUF files once."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from reinforge.config.schema import GradientCheckpointingKwargs, ReinforgeConfig
from reinforge.models.chat_templates import resolve_chat_template

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("REINFORGE_CACHE", Path.home() / ".cache" / "reinforge"))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a `.gguf` file into a Hugging Face directory (safetensors + tokenizer).

    transformers loads GGUF (needs the `gguf` package) but refuses to save such a model; the weights are
    moved into a model built from the same config. Written to a temporary directory renamed into place,
    so an interrupted conversion leaves nothing that looks complete.

    Raises:
        FileNotFoundError: no such file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def resolve_model_path(path: str) -> str:
    """A model path usable by `from_pretrained`: `.gguf` files are converted once into the cache."""
    if not path.endswith(".gguf"):
        return path
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = CACHE_DIR / "gguf" / f"{p.stem}-{key}"
    if not (out / "config.json").exists():
        log.info("de-quantising %s into %s (once)", p, out)
        convert_gguf(p, out)
    return str(out)


def load_tokenizer(cfg: ReinforgeConfig):
    """The tokenizer with the configured chat template and a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer_config or cfg.base_model))
    template = resolve_chat_template(cfg.chat_template, cfg.chat_template_jinja, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype(cfg: ReinforgeConfig) -> torch.dtype:
    # Master weights stay float32; bf16/fp16 run as autocast mixed precision through accelerate.
    return torch.float32


def load_causal_lm(path: str, cfg: ReinforgeConfig):
    """`AutoModelForCausalLM` from a directory, Hub id (offline when cached) or `.gguf` file."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation(cfg)} if attn_implementation(cfg) else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=_dtype(cfg), **kwargs)
    model.config.use_cache = False
    return model


def attn_implementation(cfg: ReinforgeConfig) -> str | None:
    """transformers' `attn_implementation` from Axolotl's `flash_attention` / `flex_attention` keys (None: the
    model's default, sdpa). `training.setup.make_accelerator` refuses both without CUDA."""
    if cfg.flash_attention:
        return "flash_attention_2"
    if cfg.flex_attention:
        return "flex_attention"
    return None


def lora_config(cfg: ReinforgeConfig):
    """peft `LoraConfig` from Axolotl's keys (`lora_target_linear` → every linear layer but the head)."""
    from peft import LoraConfig

    if cfg.lora_target_linear:
        targets = "all-linear"
    elif cfg.lora_target_modules:
        targets = cfg.lora_target_modules
    else:
        targets = None  # peft's per-architecture default (q_proj, v_proj for Llama)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      modules_to_save=cfg.lora_modules_to_save, task_type="CAUSAL_LM")


def load_policy(cfg: ReinforgeConfig):
    """The trainable policy: the full model, or the model with a fresh LoRA adapter.

    Raises:
        ValueError: `adapter: qlora` without CUDA (bitsandbytes 4-bit needs a GPU).
    """
    if cfg.adapter == "qlora" and not torch.cuda.is_available():
        from reinforge.training.setup import QLORA_ON_CPU

        raise ValueError(QLORA_ON_CPU)
    model = load_causal_lm(cfg.base_model, cfg)
    if cfg.gradient_checkpointing:
        ckpt = (cfg.gradient_checkpointing_kwargs or GradientCheckpointingKwargs()).as_kwargs()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    if cfg.adapter:
        from peft import get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(cfg))
    return model


class Reference:
    """The frozen reference policy π_ref: a context manager that yields the module to run.

    Either the policy with its adapter disabled (no extra memory) or a separate frozen model
    (`model`: a `LogpsModel` around it; `source`: the path or id it was loaded from).
    Always run under `torch.no_grad()` in eval mode (no dropout).
    """

    def __init__(self, model=None, policy=None, source: str | None = None):
        self.model, self.policy, self.source = model, policy, source

    @property
    def kind(self) -> str:
        """What the reference is, for logs: "adapter-disabled policy" or "frozen model <source>"."""
        if self.model is None:
            return "adapter-disabled policy"
        return f"frozen model {self.source}" if self.source else "frozen model"

    @contextmanager
    def active(self, policy_module) -> Iterator[torch.nn.Module]:
        """Yield a module computing reference outputs. `policy_module` is the (possibly wrapped) policy."""
        if self.model is not None:
            with torch.no_grad():
                yield self.model
            return
        peft_model = self.policy
        was_training = policy_module.training
        policy_module.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                yield policy_module
        finally:
            policy_module.train(was_training)


def load_reference(cfg: ReinforgeConfig, policy) -> Reference:
    """The reference for a method that needs one (as Axolotl and TRL choose it):

    - `ref_model` set: that model, loaded separately and frozen (with or without an adapter);
    - an adapter without `ref_model`: the policy with its adapter disabled, unless `rl_adapter_ref_model: true`,
      which loads `base_model` again as a separate frozen model (the same weights, in memory twice);
    - full fine-tuning: a frozen copy of `base_model`.

    Raises:
        RunError: the reference's vocabulary size differs from the policy's (log-probs of the same token ids
            would compare different tokens).
    """
    if cfg.adapter and not cfg.rl_adapter_ref_model and not cfg.ref_model:
        return Reference(policy=policy)
    from reinforge.models.forward import LogpsModel

    source = cfg.ref_model or cfg.base_model
    model = load_causal_lm(source, cfg)
    ref_vocab, policy_vocab = model.get_input_embeddings().num_embeddings, policy.get_input_embeddings().num_embeddings
    if ref_vocab != policy_vocab:
        from reinforge.training.setup import RunError

        raise RunError(f"ref_model {source} has a vocabulary of {ref_vocab} tokens but the policy ({cfg.base_model}) "
                       f"has {policy_vocab}: the reference must use the policy's tokenizer")
    model.eval()
    model.requires_grad_(False)
    return Reference(model=LogpsModel(model), source=source)
