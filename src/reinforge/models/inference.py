"""`reinforge inference`: chat with the trained model, streaming its tokens as they are generated.

Which model answers (`load_inference_model`):
1. `--lora-model-dir DIR`: the base model with the adapter in DIR (an error when DIR is not an adapter);
2. a config with `adapter:`: the base model with the adapter `reinforge train` saved in `output_dir`;
3. a config without `adapter:`: the full model `reinforge train` saved in `output_dir`;
4. when 2 or 3 finds nothing in `output_dir`: the base model, with a note on stderr saying so.

Prompts are rendered as training renders them: the tokenizer of `load_tokenizer` (the config's
`chat_template`), `apply_chat_template(..., add_generation_prompt=True, **trl.chat_template_kwargs)`,
tokenised without special tokens (the template writes its own BOS). The conversation is kept: each
answer (its text without special tokens) is appended as an assistant message before the next question.

Sampling settings default to the config's `trl:` keys (`temperature`, `top_p`, `top_k`, `min_p`,
`repetition_penalty`, `max_completion_length` as `max_new_tokens`, `generation_kwargs`); flags override
them; temperature 0 means greedy decoding. Sampling is seeded once with the config's `seed`, so a session
with the same inputs gives the same answers. Answers go to stdout, notes and the interactive prompt to stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from reinforge.config.schema import ReinforgeConfig

EXIT_WORDS = ("exit", "quit")


@dataclass
class GenerationSettings:
    """Decoding settings of `reinforge inference`; `temperature == 0` is greedy decoding."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (top_k off unless set: generate's default would be 50)."""
        kwargs: dict[str, Any] = {**self.extra, "max_new_tokens": self.max_new_tokens,
                                  "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return {**kwargs, "do_sample": False}
        kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        if self.min_p is not None:
            kwargs["min_p"] = self.min_p
        return kwargs


def generation_settings(cfg: ReinforgeConfig, *, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None) -> GenerationSettings:
    """The config's `trl:` sampling keys, each overridden by its argument when that is not None.

    Raises:
        ValueError: max_new_tokens < 1, temperature < 0, top_p outside (0, 1], or top_k < 0.
    """
    t = cfg.trl
    s = GenerationSettings(
        max_new_tokens=t.max_completion_length if max_new_tokens is None else max_new_tokens,
        temperature=t.temperature if temperature is None else temperature,
        top_p=t.top_p if top_p is None else top_p, top_k=t.top_k if top_k is None else top_k, min_p=t.min_p,
        repetition_penalty=t.repetition_penalty, extra=dict(t.generation_kwargs or {}))
    if s.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1 (got {s.max_new_tokens})")
    if s.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, 0 meaning greedy (got {s.temperature})")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {s.top_p})")
    if s.top_k is not None and s.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, 0 meaning off (got {s.top_k})")
    return s


def load_inference_model(cfg: ReinforgeConfig, lora_model_dir: str | Path | None = None,
                         config_path: str = "CONFIG") -> tuple[Any, str | None]:
    """(model in eval mode, note) for the rules of the module docstring; `note` is None unless the base model is
    used because `output_dir` has no trained model.

    Raises:
        ArtifactError: `lora_model_dir` is not a peft adapter directory.
        ValueError: `adapter: qlora` without CUDA.
    """
    from reinforge.models.loading import load_causal_lm
    from reinforge.models.merge import check_adapter_dir, has_full_model, is_adapter_dir, load_adapter_model

    out = Path(cfg.output_dir)
    if lora_model_dir is not None:
        return load_adapter_model(cfg, check_adapter_dir(lora_model_dir, config_path)), None
    if cfg.adapter and is_adapter_dir(out):
        return load_adapter_model(cfg, out), None
    if not cfg.adapter and has_full_model(out):
        return load_causal_lm(str(out), cfg).eval(), None
    what = "adapter" if cfg.adapter else "model"
    note = (f"note: no trained {what} in {out} (`reinforge train {config_path}` saves it there); answering with the "
            f"base model {cfg.base_model}")
    return load_causal_lm(cfg.base_model, cfg).eval(), note


def _streamer(tokenizer, out: TextIO):
    """A transformers `TextStreamer` that writes the answer to `out` (not print), flushed piece by piece."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """A conversation with a model: each `reply` renders the whole history with the chat template.

    Args:
        model, tokenizer: a causal LM (plain or peft) and the tokenizer with its chat template.
        settings: decoding settings.
        chat_kwargs: extra `apply_chat_template` arguments (`trl.chat_template_kwargs`).
        out: where answers stream to (default: sys.stdout at the time of each reply).
    """

    def __init__(self, model, tokenizer, settings: GenerationSettings, chat_kwargs: dict[str, Any] | None = None,
                 out: TextIO | None = None):
        from reinforge.rollout.factory import eos_token_ids

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.chat_kwargs = chat_kwargs or {}
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.eos = eos_token_ids(model, tokenizer)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered with the generation prompt, as training renders prompts."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.chat_kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def reply(self, text: str) -> str:
        """Answer `text` after the conversation so far, streaming the answer; returns it (without special tokens)
        and appends both messages to the history."""
        messages = [*self.messages, {"role": "user", "content": text}]
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(messages)], device=device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  streamer=_streamer(self.tokenizer, self.out or sys.stdout),
                                  eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                  **self.settings.generate_kwargs())
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer


def run_inference(cfg: ReinforgeConfig, *, prompt: str | None = None, lora_model_dir: str | Path | None = None,
                  settings: GenerationSettings | None = None, config_path: str = "CONFIG",
                  stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Answer `prompt` once, or chat: read questions from `stdin`, one a line, until EOF, an empty line or
    `exit`/`quit`, keeping the history. Returns the exit code (0; 130 after Ctrl-C).

    Args:
        cfg: the run's config; `settings`: decoding settings (default: `generation_settings(cfg)`).
        stdin, stdout, stderr: default sys.stdin / sys.stdout / sys.stderr at call time.
    Raises:
        ConfigError: the tokenizer has no chat template and the config sets none.
        ArtifactError, ValueError: from `load_inference_model`.
    """
    from reinforge.config import ConfigError
    from reinforge.models.loading import load_tokenizer

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tokenizer = load_tokenizer(cfg)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{config_path}: the tokenizer of {cfg.tokenizer_config or cfg.base_model} has no chat "
                          f"template; set `chat_template:` in the config (e.g. chatml) or pass chat_template=chatml")
    model, note = load_inference_model(cfg, lora_model_dir, config_path)
    if torch.cuda.is_available():
        model.to("cuda")
    if note:
        print(note, file=stderr)
    torch.manual_seed(cfg.seed)
    session = ChatSession(model, tokenizer, settings or generation_settings(cfg), cfg.trl.chat_template_kwargs, stdout)
    interactive = prompt is None and stdin.isatty()
    if interactive:
        print("Type a message (an empty line, `exit` or Ctrl-D ends the chat).", file=stderr)
    try:
        if prompt is not None:
            session.reply(prompt)
            return 0
        while True:
            if interactive:
                print("> ", end="", file=stderr, flush=True)
            line = stdin.readline()
            text = line.strip()
            if not line or not text or text in EXIT_WORDS:
                return 0
            session.reply(text)
    except KeyboardInterrupt:
        print(file=stderr)
        return 130
