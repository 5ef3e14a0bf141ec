"""Between reinforge's text completions and the OpenAI Responses objects NeMo Gym's servers speak.

A completion becomes a Responses `response` whose `output` holds the assistant text as a `message` item and every
tool call written in the Hermes form (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the form vLLM's
`hermes` tool-call parser reads and Qwen/Hermes chat templates teach) as a `function_call` item. A `<tool_call>`
block whose JSON does not parse stays in the text (the verifier then sees no call). The row's tools (Responses
function tools) are also given to the chat template, in the Chat Completions form, when rendering the prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

#: Row columns that are reinforge's, not the dataset's (never sent to NeMo Gym).
OWN_COLUMNS = ("prompt", "prompt_ids")


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text without its parsed tool-call blocks, stripped; [{"name", "arguments" (a JSON string)}])."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for m in TOOL_CALL.finditer(text):
        try:
            data = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            continue
        args = data.get("arguments", data.get("parameters", {}))
        calls.append({"name": data["name"], "arguments": args if isinstance(args, str) else json.dumps(args)})
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def response_object(text: str, params: dict[str, Any], model: str, response_id: str = "resp_reinforge") -> dict[str, Any]:
    """The Responses `response` for one completion `text` sampled for the request `params` (the row's
    `responses_create_params`): output items as in the module docstring; tools, tool_choice and
    parallel_tool_calls echoed from the request."""
    message, calls = parse_tool_calls(text)
    output: list[dict[str, Any]] = []
    if message or not calls:
        output.append({"id": f"msg_{response_id}", "type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": message, "annotations": []}]})
    for i, call in enumerate(calls):
        output.append({"id": f"fc_{response_id}_{i}", "type": "function_call", "call_id": f"call_{response_id}_{i}",
                       "name": call["name"], "arguments": call["arguments"], "status": "completed"})
    return {"id": response_id, "created_at": 0, "model": model, "object": "response", "output": output,
            "parallel_tool_calls": bool(params.get("parallel_tool_calls", True)),
            "tool_choice": params.get("tool_choice", "auto"), "tools": list(params.get("tools") or [])}


def verify_body(row: dict[str, Any], text: str, model: str, response_id: str) -> dict[str, Any]:
    """The `/verify` request for `text` sampled from `row`: the row's own fields (its `responses_create_params`
    with system message and tools, and whatever else the resource server reads, e.g. an expected answer) plus the
    `response`."""
    params = row.get("responses_create_params")
    if not isinstance(params, dict):
        raise ValueError("the row has no `responses_create_params` mapping (NeMo Gym rows carry the request there; "
                         "keep the column: datasets[].type chat_template with field_messages: "
                         "responses_create_params.input)")
    body = {k: v for k, v in row.items() if k not in OWN_COLUMNS and not k.startswith("_")}
    body["response"] = response_object(text, params, model, response_id)
    return body


def chat_tools(params: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's function tools in the Chat Completions form chat templates read, or None without tools."""
    out = []
    for tool in params.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        if "function" in tool:  # already Chat Completions style
            out.append(tool)
        elif tool.get("type", "function") == "function" and "name" in tool:
            out.append({"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                                         "parameters": tool.get("parameters") or {}}})
    return out or None
