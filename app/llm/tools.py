"""Tool calls in a model's own text: how a conversation with tools is shown to the model, and how its calls are read
back from what it wrote.

The format is Qwen2.5's (NousResearch's Hermes format, which vLLM's `hermes` parser reads): the tools as JSON lines
inside `<tools></tools>` in the system message, each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`, each result as `<tool_response>\\n...\\n</tool_response>` in a user turn. A model whose chat template
takes `tools` (Qwen2.5's) gets tools, calls and results through its own template; one whose template does not
(SmolLM2's) gets the same text built here, so fine-tuning an adapter on this format works for either.

When the request forces a call (`tool_choice` `required` or a named function), the engine holds the reply to this
format with a grammar (`engine/rows/grammar.py`), so even a small model's call is well formed and its arguments
valid for the tool's schema; with `auto` the model chooses, and a reply is a call only where it wrote a complete,
valid one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from app.llm.base import ChatMessage, OutputConstraint, Tool, ToolCall, ToolUse, canonical_json

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
#: Calls one reply may make when parallel calls are allowed (a bound on what a looping model can write).
MAX_CALLS_PER_REPLY = 8
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def openai_tool(tool: Tool) -> dict[str, Any]:
    """`tool` as OpenAI's `tools[]` entry (what chat templates and remote engines take)."""
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters_object}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def template_takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (it names them); otherwise they are rendered here."""
    return bool(chat_template) and "tools" in str(chat_template)


def conversation(messages: Sequence[ChatMessage], tools: ToolUse | None, native: bool) -> list[dict[str, Any]]:
    """The messages as the chat template takes them. `native`: the template renders tools, calls and results
    itself (`template_takes_tools`), given HF's message shapes; else they are written here as text."""
    if native:
        return [_native(message) for message in messages]
    shown: list[dict[str, Any]] = []
    previous = ""  # the role of the message before this one
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous == "tool":  # results of one round of calls go in one user turn
                shown[-1]["content"] += "\n" + result
            else:
                shown.append({"role": "user", "content": result})
        elif message.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in message.get("tool_calls", ()))
            shown.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], calls]))})
        else:
            shown.append({"role": message["role"], "content": message["content"]})
        previous = message["role"]
    if tools is not None and tools.tools:
        listed = _TOOLS_PREAMBLE + "\n".join(json.dumps(openai_tool(t), ensure_ascii=False) for t in tools.tools)
        if shown and shown[0]["role"] == "system":
            shown[0] = {"role": "system", "content": f"{shown[0]['content']}\n\n{listed}{_TOOLS_INSTRUCTIONS}"}
        else:
            shown.insert(0, {"role": "system", "content": listed + _TOOLS_INSTRUCTIONS})
    return shown


def _native(message: ChatMessage) -> dict[str, Any]:
    shown: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        shown["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                                                 "arguments": json.loads(call.arguments)}}
                               for call in message.get("tool_calls", ())]
    return shown


def _call_text(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}, ensure_ascii=False)
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def forced_calls(tools: ToolUse) -> OutputConstraint | None:
    """The constraint of a reply that must call one of the forced tools (`tool_choice` required or named): one
    call, or up to MAX_CALLS_PER_REPLY with parallel calls; None when the model may answer in text."""
    forced = tools.forced
    if not forced:
        return None
    return OutputConstraint("tool_calls", canonical_json(call_schema(forced)), many=tools.parallel)


def call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON Schema of one call of any of `tools`: its name, and arguments valid for that tool's parameters.
    Arguments hold only the parameters a schema names unless it says `additionalProperties` itself: JSON Schema
    would allow any other key, and a small model does write some (LangChain's `@tool` schemas do not say it)."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": tool.name}, "arguments": _named_only(tool.parameters_object)}}
             for tool in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _named_only(parameters: dict[str, Any]) -> dict[str, Any]:
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def read_calls(text: str, tools: ToolUse) -> tuple[str, tuple[ToolCall, ...]]:
    """The calls `text` makes (complete `<tool_call>` blocks naming a known tool with an arguments object), each
    with a new id, and the text left around them. A block that is not such a call stays in the text. Once a call is
    read, a last block the budget cut short is dropped, and so is a call repeated word for word (a small model
    allowed parallel calls tends to write its one call again until its budget ends)."""
    known = {tool.name for tool in tools.tools}
    calls: list[ToolCall] = []

    def take(match: re.Match[str]) -> str:
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not (isinstance(body, dict) and body.get("name") in known and isinstance(body.get("arguments"), dict)):
            return match.group(0)
        name, arguments = body["name"], json.dumps(body["arguments"], ensure_ascii=False)
        if (calls and not tools.parallel) or any((c.name, c.arguments) == (name, arguments) for c in calls):
            return ""  # one call only (parallel_tool_calls=false), or the same call again
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments))
        return ""

    rest = _CALL.sub(take, text)
    if calls and "<tool_call>" in rest:
        rest = rest[: rest.rindex("<tool_call>")]  # an unfinished call: the budget ran out inside it
    return rest.strip(), tuple(calls)
