"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) on models with no tool format
of their own: the tools are described in the system message, calls are written as Hermes-style tags
and constrained by a grammar, and the answer is parsed back into OpenAI's `tool_calls`.

    messages = with_tools(messages, tools)            # the tools described in the system message
    spec = tools_grammar(tools, choice, parallel)     # what the answer may be (None: anything)
    content, calls = parse_calls(text)                # the answer's text and its calls

The answer's shape, the one Qwen 2.5 and Hermes models are trained on (and a small model follows
when the grammar holds it to it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_choice "required" or a named function: the answer is one call (or several with
parallel_tool_calls), each call's arguments held to its function's JSON Schema. "auto": either a
plain answer (text that does not begin with "<") or calls. "none": the tools are described but not
called. The conversation's earlier calls and results go back to the model as it would have written
and read them: an assistant turn with its <tool_call> tags, and each `tool` message as a user turn
holding <tool_response> tags.
"""

from __future__ import annotations

import json
import re
import uuid

from llama2_onnx.runtime.grammar import Grammar

CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
OPEN = "<tool_call>"

INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
         "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
         "For each function call, return a json object with function name and arguments within "
         "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
         "<args-json-object>}}\n</tool_call>")


def with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools described at the end of the system message (one is added if none)."""
    text = INTRO.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def call_text(name: str, arguments: str) -> str:
    """An earlier call as the model writes it (arguments: OpenAI's JSON string)."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        args = arguments
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n</tool_call>"


def result_text(content: str) -> str:
    """A tool's result as the model reads it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def tools_grammar(tools: list[dict], choice, parallel: bool) -> Grammar | None:
    """The grammar the answer keeps to (None for "none": a free answer)."""
    if choice == "none":
        return None
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["function"]["name"]]
    one = {"oneOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": f["name"]},
                                     "arguments": f.get("parameters") or {"type": "object", "properties": {}}}}
                     for f in functions]}
    calls = "call (\"\\n\" call)*" if parallel else "call"
    lark = (f'start: {"answer | " if choice == "auto" else ""}calls\n'
            f"calls: {calls}\n"
            f'call: "<tool_call>\\n" %json {json.dumps(one)} "\\n</tool_call>"\n'
            + ('answer: /[^<\\s](?s:.)*/\n' if choice == "auto" else ""))
    return Grammar.lark(lark)


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: OpenAI's shapes; content None when the answer is only calls."""
    calls = []
    for m in CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = CALL.sub("", text).strip()
    return rest or None, calls


def may_be_call(text: str) -> bool:
    """Whether a streamed answer so far may still be a call (held back until it is known)."""
    t = text.lstrip()
    return t.startswith(OPEN) or OPEN.startswith(t)
