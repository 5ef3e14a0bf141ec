"""Named chat templates for `chat_template:` (Axolotl's names); `tokenizer_default` keeps the tokenizer's.

Values of `chat_template:`
- unset or `tokenizer_default`: the tokenizer's own template (`tokenizer_default` is an error when
  the tokenizer has none; unset leaves it as it is);
- `tokenizer_default_fallback_<name>`: the tokenizer's own template, or `<name>` when it has none;
- `jinja`: the template given in `chat_template_jinja`;
- a name below. Each renders `messages` (`role`, `content`) and, with `add_generation_prompt`, the
  assistant header. Templates that start with `bos_token` write the BOS themselves; reinforge
  tokenises rendered text without adding special tokens, so there is never a second BOS.

| name | turn layout |
|---|---|
| chatml | `<|im_start|>{role}\\n{content}<|im_end|>\\n` |
| qwen_25 | chatml, with Qwen2.5's default system message when the first message is not a system one |
| llama3 | `bos` once, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>` |
| phi_3 | `bos`, `<|{role}|>\\n{content}<|end|>\\n`, the user turn followed by `<|assistant|>\\n` |
| gemma | `bos`, `<start_of_turn>{user|model}\\n{content stripped}<end_of_turn>\\n`; no system role |
| mistral_v1 | `bos`, ` [INST] {user} [/INST]`, ` {assistant}` + eos; user/assistant alternate |
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

PHI_3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('phi_3 supports the roles system, user and assistant') }}{% endif %}"
    "{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('the gemma template has no system role') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('gemma: roles must alternate user/assistant') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('mistral_v1: roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral_v1 supports the roles user and assistant') }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"chatml": CHATML, "qwen_25": QWEN_25, "llama3": LLAMA3, "phi_3": PHI_3, "gemma": GEMMA,
             "mistral_v1": MISTRAL_V1}
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def valid_names() -> list[str]:
    """Every accepted value of `chat_template:`."""
    return ["tokenizer_default", "jinja", *TEMPLATES, *(FALLBACK_PREFIX + n for n in TEMPLATES)]


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer) -> str | None:
    """The Jinja template to use, or None to keep the tokenizer's own.

    Raises:
        ValueError: unknown name, `jinja` without a template, or `tokenizer_default` on a tokenizer
            without a template.
    """
    if name in (None, "tokenizer_default"):
        if tokenizer.chat_template is None and name == "tokenizer_default":
            raise ValueError("chat_template: tokenizer_default, but the tokenizer has no chat template; "
                             f"choose one of {', '.join(TEMPLATES)} or tokenizer_default_fallback_<name>")
        return None
    if name == "jinja":
        if not jinja:
            raise ValueError("chat_template: jinja needs chat_template_jinja")
        return jinja
    if name.startswith(FALLBACK_PREFIX):
        fallback = name[len(FALLBACK_PREFIX):]
        if fallback not in TEMPLATES:
            raise ValueError(f"unknown chat_template {name!r}; valid: {', '.join(valid_names())}")
        return None if tokenizer.chat_template else TEMPLATES[fallback]
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; valid: {', '.join(valid_names())}")
    return TEMPLATES[name]
