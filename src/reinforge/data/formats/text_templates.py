"""Axolotl's text-templated formats: `chatml.*`, `llama3.*` (DPO and KTO) and `zephyr.nectar`.

These formats write the chat markup into the text themselves (the tokenizer's chat template is not
used), exactly as Axolotl 0.19's strategies of the same names do: the prompt is a system turn (when
the row has a non-empty `system`), one user turn and the assistant header; each response is its text
followed by the end-of-turn marker. The DPO `argilla_chat`/`ultra` variants use only the first
exchange of a conversation (as Axolotl); rows with more turns are counted and reported (for
multi-turn DPO data use `chat_template.argilla_chat`). The KTO `argilla_chat` variant renders the
whole history before the last message as the prompt, one turn per message (as Axolotl 0.19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import alias, register
from reinforge.data.formats.messages import field, label_value


@dataclass(frozen=True)
class Markup:
    """Turn markup of a chat format: `start(role)` + content + `end`."""

    name: str
    begin: str  # before the role name
    after_role: str  # between the role name and the content
    end: str  # end of a turn (also ends each response)
    between: str  # after `end` when another turn follows

    def turn(self, role: str, content: str) -> str:
        return f"{self.begin}{role}{self.after_role}{content}{self.end}{self.between}"

    def prompt(self, user: str, system: str | None = None) -> str:
        """System turn (when given and non-empty), the user turn, the assistant header."""
        head = self.turn("system", system) if system else ""
        return head + self.turn("user", user) + f"{self.begin}assistant{self.after_role}"

    def history_prompt(self, history: list[dict[str, str]]) -> str:
        """Every message of `history` as a turn of its own role, then the assistant header."""
        return "".join(self.turn(msg["role"], msg["content"]) for msg in history) + f"{self.begin}assistant{self.after_role}"

    def response(self, text: str) -> str:
        return text + self.end


CHATML = Markup("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n")
LLAMA3 = Markup("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "")


def _system(row: dict[str, Any]) -> str | None:
    value = row.get("system")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RowError("system", f"expected text, got {type(value).__name__}")
    return value


def _text(row: dict[str, Any], name: str) -> str:
    return field(row, name, str)


def _exchange(row: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], bool]:
    """`row[name]` as a [user, assistant, ...] message list; returns (messages, has_more_turns)."""
    msgs = field(row, name, list)
    if len(msgs) < 2:
        raise RowError(name, f"expected a conversation [user message, assistant message], got {len(msgs)} message(s)")
    for i, (want, msg) in enumerate(zip(("user", "assistant"), msgs[:2])):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise RowError(name, f"message {i} must be a mapping with text `content`, got {str(msg)[:80]}")
        role = msg.get("role")
        if role is not None and role != want:
            raise RowError(name, f"message {i} must be the {want} turn, got role {role!r} "
                                 "(for other layouts use chat_template.argilla_chat)")
    return msgs, len(msgs) > 2


_TURN_ROLES = ("system", "user", "assistant", "tool")


def _turns(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    """`row[name]` as a non-empty list of `{role, content}` messages with standard roles (for a turn-by-turn
    rendering). Raises RowError naming the field and the first bad message."""
    msgs = field(row, name, list)
    if not msgs:
        raise RowError(name, "expected a non-empty list of messages, got []")
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or not isinstance(msg.get("role"), str):
            raise RowError(name, f"message {i} must be a mapping with text `role` and `content`, got {str(msg)[:80]}")
        if msg["role"] not in _TURN_ROLES:
            raise RowError(name, f"message {i} has role {msg['role']!r}; expected one of {', '.join(_TURN_ROLES)}")
    return [{"role": msg["role"], "content": msg["content"]} for msg in msgs]


def _first_present(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of `keys` the row has a value for (a column that is None in this row is skipped:
    `datasets` fills columns missing from some rows of a JSON file with None)."""
    for key in keys:
        if row.get(key) is not None:
            return key
    return keys[-1]


_EX_SYSTEM = "You are a careful assistant."
_EX_CONV_CHOSEN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
_EX_CONV_REJECTED = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]


def _register_paired(m: Markup) -> None:
    def finish(row: dict[str, Any], user: str, chosen: str, rejected: str, note: str | None = None) -> dict[str, Any]:
        out = {"prompt": m.prompt(user, _system(row)), "chosen": m.response(chosen), "rejected": m.response(rejected)}
        if note:
            out["_note"] = note
        return out

    @register(f"{m.name}.default", "paired", example={"system": _EX_SYSTEM, "instruction": "What is 2+2?",
                                                       "chosen_response": "4", "rejected_response": "5"})
    def default(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        """Prompt from the first of `prompt`, `input`, `question`, `instruction` the row has; responses from
        `chosen`/`rejected` (else `chosen_response`/`rejected_response`); optional `system`."""
        pk = _first_present(row, ("prompt", "input", "question", "instruction"))
        ck = _first_present(row, ("chosen", "chosen_response"))
        rk = _first_present(row, ("rejected", "rejected_response"))
        return finish(row, _text(row, pk), _text(row, ck), _text(row, rk))

    alias(f"{m.name}.argilla", f"{m.name}.default", "paired")

    @register(f"{m.name}.argilla_chat", "paired", example={"chosen": _EX_CONV_CHOSEN, "rejected": _EX_CONV_REJECTED})
    def argilla_chat(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        """`chosen`/`rejected` conversations: the prompt is chosen's first (user) message, the
        responses the second message of each."""
        chosen, more_c = _exchange(row, "chosen")
        rejected, more_r = _exchange(row, "rejected")
        return finish(row | {"system": None}, chosen[0]["content"], chosen[1]["content"], rejected[1]["content"],
                      "turns after the first exchange ignored" if (more_c or more_r) else None)

    for suffix, key, doc in (("icr", "input", "input"), ("intel", "question", "question"), ("prompt_pairs", "prompt", "prompt")):
        def make(key: str = key) -> Any:
            def fn(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
                return finish(row, _text(row, key), _text(row, "chosen"), _text(row, "rejected"))

            fn.__doc__ = f"Prompt from `{key}`, optional `system`, text `chosen`/`rejected`."
            return fn

        register(f"{m.name}.{suffix}", "paired", example={"system": _EX_SYSTEM, key: "What is 2+2?",
                                                           "chosen": "4", "rejected": "5"})(make())

    @register(f"{m.name}.ultra", "paired", example={"system": _EX_SYSTEM, "prompt": "What is 2+2?",
                                                     "chosen": _EX_CONV_CHOSEN, "rejected": _EX_CONV_REJECTED})
    def ultra(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        """Prompt from `prompt`, optional `system`; responses are the second message of the
        `chosen`/`rejected` conversations."""
        chosen, more_c = _exchange(row, "chosen")
        rejected, more_r = _exchange(row, "rejected")
        return finish(row, _text(row, "prompt"), chosen[1]["content"], rejected[1]["content"],
                      "turns after the first exchange ignored" if (more_c or more_r) else None)


def _register_unpaired(m: Markup) -> None:
    def finish(row: dict[str, Any], ds: DatasetConfig, user: str, completion: str, system: str | None) -> dict[str, Any]:
        return {"prompt": m.prompt(user, system), "completion": m.response(completion),
                "label": label_value(row, ds.field_label or "label")}

    for suffix, key in (("argilla", "instruction"), ("intel", "question"), ("prompt_pairs", "prompt"), ("ultra", "prompt")):
        def make(key: str = key) -> Any:
            def fn(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
                return finish(row, ds, _text(row, key), _text(row, "completion"), _system(row))

            fn.__doc__ = f"Prompt from `{key}`, optional `system`, text `completion`, bool `label`."
            return fn

        register(f"{m.name}.{suffix}", "unpaired", example={"system": _EX_SYSTEM, key: "What is 2+2?",
                                                             "completion": "4", "label": True})(make())

    @register(f"{m.name}.argilla_chat", "unpaired",
              example={"completion": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                       "label": True})
    def argilla_chat(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        """`completion` is a conversation (argilla/kto-mix-15k): its last (assistant) message is the
        completion, every message before it the prompt, one turn per message in its own role, then the
        assistant header (Axolotl 0.19's rule; the `system` column is not used). When `completion` is
        only the assistant message, the history is `chosen` (the layout Axolotl documents for chatml;
        Axolotl 0.19 would write a prompt with no turn at all)."""
        comp = _turns(row, "completion")
        history = comp[:-1] if len(comp) >= 2 else _turns(row, "chosen")
        if comp[-1]["role"] != "assistant":
            raise RowError("completion", f"the last message must be the assistant completion, got role {comp[-1]['role']!r}")
        return {"prompt": m.history_prompt(history), "completion": m.response(comp[-1]["content"]),
                "label": label_value(row, ds.field_label or "label")}


for _markup in (CHATML, LLAMA3):
    _register_paired(_markup)
    _register_unpaired(_markup)


@register("zephyr.nectar", "paired", example={
    "prompt": "What is 2+2?",
    "answers": [{"answer": "4", "rank": 1}, {"answer": "5", "rank": 2}, {"answer": "22", "rank": 3}],
})
def zephyr_nectar(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """Nectar-style ranked answers in the Zephyr markup: rank 1 is the best answer. The chosen
    response is the best-ranked answer, the rejected one the second best. The responses carry no end
    marker (the tokenizer's EOS is appended at tokenisation, as TRL does for text)."""
    prompt = _text(row, "prompt")
    answers = field(row, "answers", list)
    if len(answers) < 2:
        raise RowError("answers", f"need at least two ranked answers, got {len(answers)}")
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str) or not isinstance(a.get("rank"), (int, float)) \
                or isinstance(a.get("rank"), bool):
            raise RowError("answers", f"answer {i} must be {{answer: text, rank: number}}, got {str(a)[:80]}")
    ranked = sorted(answers, key=lambda a: a["rank"])
    return {"prompt": f"<|system|>\n</s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n",
            "chosen": ranked[0]["answer"], "rejected": ranked[1]["answer"]}
