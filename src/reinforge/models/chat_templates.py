"""Named chat templates for `chat_template:` (Axolotl's names); `tokenizer_default` keeps the tokenizer's."""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer) -> str | None:
    """The Jinja template to use, or None to keep the tokenizer's own.

    Raises:
        ValueError: unknown name, or `tokenizer_default` on a tokenizer without a template.
    """
    if name in (None, "tokenizer_default"):
        if tokenizer.chat_template is None and name == "tokenizer_default":
            raise ValueError("chat_template: tokenizer_default, but the tokenizer has no chat template")
        return None
    if name == "jinja":
        return jinja
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; valid: tokenizer_default, jinja, {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
