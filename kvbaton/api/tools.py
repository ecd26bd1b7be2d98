"""Tool calling for chat: ``tools`` and ``tool_choice`` in, OpenAI ``tool_calls`` out.

The format is Hermes' (also Qwen2.5's and SmolLM3's): the tools are described in the system
prompt inside ``<tools></tools>``, and the model calls one by writing
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A chat template that renders
tools itself (Qwen2.5's, in this same format) is given them as they are. The bundled models'
templates know nothing of tools, so for those kvbaton renders the conversation (:func:`render`):
the tool descriptions join the system message, an assistant turn's ``tool_calls`` become its
``<tool_call>`` text and a ``tool`` message becomes a user turn holding
``<tool_response></tool_response>``, which any chat template can take; the worker and the
router render alike, so they compute the same prompt tokens.

``tool_choice``: ``none`` (the tools are not shown and nothing is parsed), ``auto`` (the
default with tools: the model decides, the output is parsed), ``required`` (the output is
constrained to one or more calls of the given tools, their arguments to each tool's
``parameters`` schema) or ``{"type": "function", "function": {"name": N}}`` (one call of N).
The constraints are llguidance grammars with the schemas inline (:func:`constraint`), so a
tool whose ``parameters`` is not a valid schema is a 400 before anything runs.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvbaton.api.protocol import ApiError
from kvbaton.sampling_params import StructuredOutput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# Compact JSON in the constrained calls: small models would otherwise write whitespace forever.
_COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, description and ``parameters`` schema."""

    name: str
    description: str
    parameters: dict[str, Any]

    def declaration(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(tools: Any) -> list[Tool]:
    """The request's ``tools``; a 400 naming ``tools`` for anything but a list of
    ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``."""
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "tools: must be a non-empty list of functions", "tools", "invalid_value")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}]: must be {{\"type\": \"function\", \"function\": {{...}}}}",
                           "tools", "invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ApiError(400, f"tools[{i}].function.name: 1-64 letters, digits, '_', '.' or '-'",
                           "tools", "invalid_value")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters: must be a JSON schema object",
                           "tools", "invalid_value")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ApiError(400, f"tools[{i}].function.description: must be a string", "tools", "invalid_value")
        if any(o.name == name for o in out):
            raise ApiError(400, f"tools[{i}].function.name: {name!r} is declared twice", "tools", "invalid_value")
        out.append(Tool(name, desc, params))
    return out


def parse_tool_choice(choice: Any, tools: list[Tool]) -> str:
    """``none``, ``auto``, ``required`` or the name of the one function to call; a 400 naming
    ``tool_choice`` otherwise (a function that is not among the tools, too)."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice: {choice!r} needs tools", "tool_choice", "invalid_value")
        return str(choice)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise ApiError(400, "tool_choice: none, auto, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", "tool_choice", "invalid_value")
    if not any(t.name == name for t in tools):
        raise ApiError(400, f"tool_choice: function {name!r} is not among the tools", "tool_choice",
                       "invalid_value")
    return name


def _system_text(tools: list[Tool]) -> str:
    decls = "\n".join(json.dumps(t.declaration()) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{decls}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render(messages: list[dict[str, Any]], tools: list[Tool], choice: str,
           native: bool = False) -> list[dict[str, Any]]:
    """The conversation as plain ``{"role", "content"}`` turns any chat template takes (see the
    module docstring); the tools are shown unless ``choice`` is ``none``. ``native``: for a
    template that renders tools itself, the turns keep OpenAI's shape (an assistant turn's
    ``tool_calls``, ``tool`` turns) and the tools go to the template (:func:`template_tools`)."""
    if native:
        return [{**m, "tool_calls": [{"type": "function", "function": c} for c in m["tool_calls"]]}
                if m.get("tool_calls") else dict(m) for m in messages]
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [f"{OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']})}\n{CLOSE}"
                     for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools and choice != "none":
        system = _system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def template_tools(tools: list[Tool], choice: str) -> list[dict[str, Any]] | None:
    """The declarations a template that renders tools is given (None: none are shown)."""
    return [t.declaration() for t in tools] if tools and choice != "none" else None


def constraint(tools: list[Tool], choice: str, parallel: bool = True, param: str = "tools") -> StructuredOutput:
    """The grammar of calls ``choice`` allows: one call of the named function, or (``required``;
    also ``auto`` and ``none``, whose grammar only checks that the tools' schemas compile) one
    or more calls of any tool, exactly one unless ``parallel``. Its errors name ``param``."""
    chosen = [t for t in tools if t.name == choice] or tools
    schema = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for t in chosen], "x-guidance": _COMPACT}
    repeat = ' ("\\n" call)*' if parallel and choice in ("required", "auto", "none") else ""
    grammar = (f"start: call{repeat}\n"
               f'call: "{OPEN}\\n" obj "\\n{CLOSE}"\n'
               f"obj: %json {json.dumps(schema)}")
    return StructuredOutput("grammar", grammar, param)


def _call(inner: str, names: set[str]) -> dict[str, Any] | None:
    """The OpenAI call a ``<tool_call>`` block's inner text makes, or None when it is not JSON
    naming one of ``names``."""
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args)}}


def parse_output(text: str, tools: list[Tool]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a finished output: every well-formed ``<tool_call>`` block
    naming a known tool becomes a call; the text before the first call is the content (None
    when empty and there are calls); a malformed block stays in the content, as written."""
    names = {t.name for t in tools}
    calls: list[dict[str, Any]] = []
    first = None
    for match in _CALL.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            return text, []  # not a clean set of calls: leave the text alone
        calls.append(call)
        first = match.start() if first is None else first
    if not calls:
        return text, []
    content = text[:first].strip()
    return (content or None), calls


def finish_reason(finish: str | None, has_calls: bool) -> str | None:
    """A finished chat choice's ``finish_reason``: ``tool_calls`` when it stopped after calls
    (cut off by ``length``, it stays ``length``)."""
    return "tool_calls" if has_calls and finish == "stop" else finish


def assistant_message(text: str, finish: str | None, tools: list[Tool] | None) -> tuple[dict[str, Any], str | None]:
    """A whole chat choice's ``message`` and ``finish_reason``, its tool calls parsed when
    ``tools`` (None: the text is the content)."""
    if not tools:
        return {"role": "assistant", "content": text}, finish
    content, calls = parse_output(text, tools)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, finish_reason(finish, bool(calls))


class ToolCallStream:
    """Streams a chat output with tools as OpenAI deltas: content while the text is not a call
    (holding back a tail that may be the start of ``<tool_call>``), then one ``tool_calls``
    delta per call, whole, as each ``</tool_call>`` arrives. A call that does not parse, or an
    output that ends inside one, is sent as content."""

    def __init__(self, tools: list[Tool]) -> None:
        self.names = {t.name for t in tools}
        self.buffer = ""
        self.num_calls = 0

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The deltas ``text`` (new output text) completes: ``{"content": ...}`` or
        ``{"tool_calls": [...]}``."""
        self.buffer += text
        deltas: list[dict[str, Any]] = []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if finished else _partial_suffix(self.buffer, OPEN)
                emit, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if emit.strip() or (emit and not self.num_calls):
                    deltas.append({"content": emit})
                break
            if start > 0:
                head = self.buffer[:start]
                if head.strip() or not self.num_calls:
                    deltas.append({"content": head})
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                if finished:
                    deltas.append({"content": self.buffer})
                    self.buffer = ""
                break
            block, self.buffer = self.buffer[:end + len(CLOSE)], self.buffer[end + len(CLOSE):]
            call = _call(block[len(OPEN):-len(CLOSE)], self.names)
            if call is None:
                deltas.append({"content": block})
                continue
            deltas.append({"tool_calls": [{"index": self.num_calls, **call}]})
            self.num_calls += 1
        return deltas

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """One chunk's ``delta``: the content and the finished calls that ``text`` completes."""
        delta: dict[str, Any] = {}
        for d in self.feed(text, finished):
            if "content" in d:
                delta["content"] = delta.get("content", "") + d["content"]
            else:
                delta.setdefault("tool_calls", []).extend(d["tool_calls"])
        return delta


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
