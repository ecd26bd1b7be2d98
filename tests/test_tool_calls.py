"""Tool calling: the Hermes format rendered into the prompt and parsed out of the output
(whole and streamed), tool_choice required / a named function constrained to valid calls,
auto and none, bad tools as 400s, and the router (colocated and disaggregated) answering as a
worker does."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from kvbaton.api.protocol import ApiError
from kvbaton.api.tools import ToolCallStream, constraint, parse_output, parse_tools, render
from kvbaton.errors import InvalidRequestError
from kvbaton.models.grammar import GrammarCompiler
from kvbaton.models.sources import tokenizer_for_model
from worker_support import router_over_workers, running_worker

MODEL = "tiny-random"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid_call(call: dict[str, Any]) -> bool:
    fn = call["function"]
    args = json.loads(fn["arguments"])
    if fn["name"] == "get_weather":
        return set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo") and isinstance(args["days"], int)
    return fn["name"] == "get_time" and args == {"zone": args.get("zone")} and args["zone"] in ("UTC", "CET")


# ---- the format -----------------------------------------------------------------------------


def test_parse_output_splits_content_and_calls() -> None:
    tools = parse_tools(TOOLS)
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    content, calls = parse_output(text, tools)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert len({c["id"] for c in calls}) == 2
    # Malformed JSON or an unknown function: the text stays as written, no calls.
    for bad in ('<tool_call>\n{"name": "get_weather", "arguments": {\n</tool_call>',
                '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'):
        assert parse_output(bad, tools) == (bad, [])
    assert parse_output("just text", tools) == ("just text", [])


def test_streamed_parsing_equals_whole_parsing_however_the_text_is_split() -> None:
    tools = parse_tools(TOOLS)
    texts = [
        'Sure <tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
        "no call here, only a < sign and <tool but not a call",
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}',  # cut off: content
    ]
    rng = random.Random(0)
    for text in texts:
        whole_content, whole_calls = parse_output(text, tools)
        for _ in range(20):
            parser, content, calls, i = ToolCallStream(tools), "", [], 0
            while i < len(text):
                j = min(len(text), i + rng.randint(1, 7))
                delta = parser.delta(text[i:j], j == len(text))
                content += delta.get("content", "")
                calls += delta.get("tool_calls", [])
                i = j
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
                [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]
            assert [c["index"] for c in calls] == list(range(len(calls)))
            if not whole_calls:
                assert content == text
            else:
                assert content.strip() == (whole_content or "")


def test_render_shows_tools_and_replays_calls_and_results() -> None:
    tools = parse_tools(TOOLS)
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather",
                                                             "arguments": {"city": "Oslo", "days": 1}}]},
        {"role": "tool", "content": "rain"},
    ]
    out = render(convo, tools, "auto")
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n' \
                                "</tool_call>"
    assert out[3] == {"role": "user", "content": "<tool_response>\nrain\n</tool_response>"}
    assert "<tools>" not in render(convo, tools, "none")[0]["content"]


def test_a_tool_with_a_bad_schema_does_not_compile() -> None:
    compiler = GrammarCompiler(tokenizer_for_model(MODEL))
    bad = parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}])
    with pytest.raises(InvalidRequestError) as e:
        compiler.check(constraint(bad, "auto"))
    assert e.value.param == "tools"
    compiler.check(constraint(parse_tools(TOOLS), "required"))
    for malformed in ([], [{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}],
                      [WEATHER, WEATHER], [{"type": "retrieval", "function": {"name": "x"}}]):
        with pytest.raises(ApiError):
            parse_tools(malformed)


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    with running_worker(num_kv_blocks=256) as w:
        yield w


def _chat(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MSGS, **body}, timeout=120)


SAMPLED = {"temperature": 1.0, "max_tokens": 160, "seed": 3}  # (a byte-level tokenizer: a call is ~70 tokens)


def test_required_tool_choice_returns_valid_calls(worker: Any) -> None:
    finishes = []
    for seed in range(3):
        r = _chat(worker.url, tools=TOOLS, tool_choice="required", **{**SAMPLED, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length"), choice
        finishes.append(choice["finish_reason"])
        if choice["finish_reason"] == "tool_calls":
            calls = choice["message"]["tool_calls"]
            assert calls and all(_valid_call(c) for c in calls)
            assert choice["message"]["content"] is None
    assert "tool_calls" in finishes  # (parallel calls may run past max_tokens: "length")


def test_a_named_function_is_the_one_called(worker: Any) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = _chat(worker.url, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, **SAMPLED)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and _valid_call(call)


def test_streamed_calls_equal_the_whole_response(worker: Any) -> None:
    body = {"tools": TOOLS, "tool_choice": "required", **SAMPLED}
    whole = _chat(worker.url, **body).json()["choices"][0]
    calls: list[dict[str, Any]] = []
    finish = None
    with httpx.stream("POST", f"{worker.url}/v1/chat/completions",
                      json={"model": MODEL, "messages": MSGS, "stream": True, **body}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    calls += ch["delta"].get("tool_calls") or []
                    finish = ch["finish_reason"] or finish
    assert finish == whole["finish_reason"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"].get("tool_calls", [])]


def test_openai_client_tool_calls(worker: Any) -> None:
    client = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS,  # type: ignore[arg-type]
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         max_tokens=160, temperature=1.0, seed=1)
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(calls[0].function.arguments)) == {"city", "days"}  # type: ignore[union-attr]
    # Streamed: the client library assembles the same call from the deltas.
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS,  # type: ignore[arg-type]
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=160, temperature=1.0, seed=1, stream=True)
    deltas = [tc for chunk in stream if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(calls[0].function.name, calls[0].function.arguments)]  # type: ignore[union-attr]
    # The conversation goes on with the call and its result, as a client sends them.
    follow = [*MSGS, out.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21C"}]
    again = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_and_none(worker: Any) -> None:
    plain = _chat(worker.url, max_tokens=4, temperature=0).json()
    none = _chat(worker.url, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0).json()
    auto = _chat(worker.url, tools=TOOLS, max_tokens=4, temperature=0).json()
    # none shows no tools: the same prompt and output as no tools at all; auto shows them.
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert auto["choices"][0]["message"]["content"] is not None  # a random model writes no calls


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages"),
]


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def router(request: pytest.FixtureRequest) -> Iterator[str]:
    with router_over_workers(request.param == "disaggregated") as url:
        yield url



@pytest.mark.parametrize("body, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tools_are_400s_naming_the_field(worker: Any, router: str, body: dict[str, Any], param: str) -> None:
    for url in (worker.url, router):
        r = _chat(url, max_tokens=4, **body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()


def test_router_tool_calls_equal_the_worker(router: str, worker: Any) -> None:
    body = {"tools": TOOLS, "tool_choice": "required", **SAMPLED}
    routed, direct = _chat(router, **body).json()["choices"][0], _chat(worker.url, **body).json()["choices"][0]
    assert routed["finish_reason"] == direct["finish_reason"]

    def calls(c: dict[str, Any]) -> list[tuple[str, str]]:
        return [(t["function"]["name"], t["function"]["arguments"]) for t in c["message"].get("tool_calls", [])]

    assert calls(routed) == calls(direct) and calls(routed)
    streamed: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{router}/v1/chat/completions",
                      json={"model": MODEL, "messages": MSGS, "stream": True, **body}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    streamed += ch["delta"].get("tool_calls") or []
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in streamed] == calls(direct)


def test_a_template_that_renders_tools_gets_them_as_they_are() -> None:
    from kvbaton.api.frontdoor import FrontDoorConfig, chat_preamble
    from kvbaton.api.protocol import ChatCompletionRequest
    from kvbaton.models.tokenizer import chat_prompt_ids, chat_template_takes_tools, copy_tokenizer

    tok = copy_tokenizer(tokenizer_for_model(MODEL))
    assert tok is not None and not chat_template_takes_tools(tok)
    # A Qwen2.5-like template: the tools in its own words, calls and results rendered by it.
    tok.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "\n{% endfor %}assistant:")
    assert chat_template_takes_tools(tok)
    convo = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    body = ChatCompletionRequest(model=MODEL, messages=convo, tools=TOOLS)
    pre = chat_preamble(FrontDoorConfig(), [MODEL], "worker", body, native_tools=True)
    assert pre.messages is not None and pre.template_tools is not None
    text = tok.decode(chat_prompt_ids(tok, pre.messages, MODEL, pre.template_tools))
    assert text.startswith("TOOLS: get_weather get_time")  # (HF trims the newline after a tag)
    assert '[call get_time {"zone": "UTC"}]' in text and "tool: 12:00" in text
    assert "<tools>" not in text  # kvbaton's own rendering is not added
    # tool_choice none: the template is given no tools.
    none = chat_preamble(FrontDoorConfig(), [MODEL], "worker",
                         ChatCompletionRequest(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="none"),
                         native_tools=True)
    assert none.template_tools is None
