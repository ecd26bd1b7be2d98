"""Structured outputs: every constrained output matches its constraint (JSON schema, any JSON
object, regex, choice, grammar), constrained and unconstrained requests batched together do
not disturb each other, a constraint that cannot finish in max_tokens ends with "length", bad
constraints are 400s naming the field, and the router and the disaggregated path give what a
worker gives."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import make_llm
from kvbaton import SamplingParams
from kvbaton.errors import InvalidRequestError
from kvbaton.sampling_params import StructuredOutput
from worker_support import router_over_workers, running_worker, wait_idle

MODEL = "tiny-random"
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                   "tag": {"enum": ["red", "green", "blue"]}},
    "required": ["id", "ok", "tag"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[0-9]{4}"
CHOICES = ["yes", "no", "maybe later"]
GRAMMAR = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
GRAMMAR_RE = r"\([0-9]{1,3}(\+[0-9]{1,3})*\)"


def _matches_schema(text: str) -> bool:
    obj = json.loads(text)
    return (set(obj) == {"id", "ok", "tag"} and isinstance(obj["id"], int) and not isinstance(obj["id"], bool)
            and isinstance(obj["ok"], bool) and obj["tag"] in ("red", "green", "blue"))


CASES = [
    (StructuredOutput("json", json.dumps(SCHEMA)), _matches_schema),
    (StructuredOutput("json", '{"type": "object"}'), lambda t: isinstance(json.loads(t), dict)),
    (StructuredOutput("regex", REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    (StructuredOutput("choice", json.dumps(CHOICES)), lambda t: t in CHOICES),
    (StructuredOutput("grammar", GRAMMAR), lambda t: re.fullmatch(GRAMMAR_RE, t) is not None),
]


@pytest.fixture(scope="module")
def llm() -> Any:
    return make_llm()


@pytest.mark.parametrize("so, ok", CASES, ids=[c[0].kind + str(i) for i, c in enumerate(CASES)])
def test_sampled_outputs_match_their_constraint(llm: Any, so: StructuredOutput, ok: Any) -> None:
    # The object schema without more constraints lets a random model write strings forever;
    # the others end well within the budget.
    budget = 48 if so.spec != '{"type": "object"}' else 8
    for seed in range(4):
        out = llm.generate(["Answer:"], SamplingParams(max_tokens=budget, temperature=1.0, seed=seed,
                                                      structured=so))[0]
        if out.finish_reason == "length":
            assert so.spec == '{"type": "object"}'
            continue
        assert out.finish_reason == "stop", out
        assert ok(out.text), out.text


def test_an_object_that_cannot_close_in_time_ends_with_length(llm: Any) -> None:
    so = StructuredOutput("json", json.dumps(SCHEMA))
    out = llm.generate(["Answer:"], SamplingParams(max_tokens=3, temperature=0, structured=so))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_constrained_and_free_requests_batched_equal_each_alone(llm: Any) -> None:
    greedy = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    prompts = ["one two", "three four five", "six", "seven eight"]
    params = [SamplingParams(**greedy, structured=CASES[i % len(CASES)][0] if i % 2 else None)
              for i in range(len(prompts))]
    batched = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, batched):
        alone = llm.generate([p], sp)[0]
        assert out.token_ids == alone.token_ids
    free = llm.generate(prompts[:1], SamplingParams(**greedy))[0]
    assert batched[0].token_ids == free.token_ids  # a neighbour's mask never reaches it


def test_bad_constraints_name_the_field_and_leave_nothing(llm: Any) -> None:
    eng = llm.engine
    for so in (StructuredOutput("json", '{"type": "nonsense"}', "response_format"),
               StructuredOutput("json", "{not json", "guided_json"),
               StructuredOutput("regex", "(a", "guided_regex"),
               StructuredOutput("choice", "[1, 2]", "guided_choice"),
               StructuredOutput("grammar", "start: (", "guided_grammar")):
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request([5, 6, 7], SamplingParams(structured=so))
        assert e.value.param == so.param
    assert eng.structured.matchers == {} and not eng.has_unfinished_requests()
    eng.check_integrity()


def test_a_decode_side_continuation_takes_the_first_token_into_its_constraint(llm: Any) -> None:
    so = StructuredOutput("json", json.dumps(SCHEMA))
    params = SamplingParams(max_tokens=40, temperature=0, structured=so)
    whole = llm.generate([[3, 4, 5]], params)[0]
    eng = llm.engine
    eng.add_request([3, 4, 5], params, request_id="cont", first_token=(whole.token_ids[0], None))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    assert final is not None and final.token_ids == whole.token_ids
    # A first token the constraint forbids (JSON cannot start with this one) is refused.
    bad = next(t for t in range(256) if llm.tokenizer.decode([t]).strip() not in ("", "{")
               and not llm.tokenizer.decode([t]).startswith((" ", "{")))
    with pytest.raises(InvalidRequestError):
        eng.add_request([3, 4, 5], params, request_id="bad", first_token=(bad, None))
    assert eng.structured.matchers == {}
    eng.check_integrity()


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    with running_worker(num_kv_blocks=256) as w:
        yield w


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def router(request: pytest.FixtureRequest) -> Iterator[str]:
    with router_over_workers(request.param == "disaggregated") as url:
        yield url



SAMPLED = {"temperature": 1.0, "max_tokens": 48, "seed": 5}
FORMS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}},
     _matches_schema),
    ({"guided_json": SCHEMA}, _matches_schema),
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t) is not None),
    ({"guided_choice": CHOICES}, lambda t: t in CHOICES),
    ({"structured_outputs": {"grammar": GRAMMAR}}, lambda t: re.fullmatch(GRAMMAR_RE, t) is not None),
]


def _post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=120)


@pytest.mark.parametrize("form, ok", FORMS, ids=[next(iter(f)) + str(i) for i, (f, _) in enumerate(FORMS)])
def test_each_request_form_constrains_the_output(worker: Any, form: dict[str, Any], ok: Any) -> None:
    r = _post(worker.url, {"prompt": "Answer:", **SAMPLED, **form})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and ok(choice["text"]), choice
    chat = _post(worker.url, {"messages": [{"role": "user", "content": "Answer"}], **SAMPLED, **form},
                 "/v1/chat/completions")
    assert chat.status_code == 200, chat.text
    assert ok(chat.json()["choices"][0]["message"]["content"])


def test_openai_client_json_schema_streamed_and_not(worker: Any) -> None:
    client = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "Give me a thing"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt,  # type: ignore[arg-type]
                                         max_tokens=48, temperature=1.0, seed=2)
    content = out.choices[0].message.content
    assert content is not None and _matches_schema(content)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt,  # type: ignore[arg-type]
                                            max_tokens=48, temperature=1.0, seed=2, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    obj = client.chat.completions.create(model=MODEL, messages=msgs, response_format={"type": "json_object"},
                                         max_tokens=6, temperature=0)
    assert obj.choices[0].message.content.startswith("{")  # type: ignore[union-attr]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
]


@pytest.mark.parametrize("form, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_400s_naming_the_field(worker: Any, router: str, form: dict[str, Any],
                                                    param: str) -> None:
    for url in (worker.url, router):
        r = _post(url, {"prompt": "x", "max_tokens": 4, **form})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    wait_idle(worker.url, 0)


def test_router_constrained_outputs_equal_the_worker(router: str, worker: Any) -> None:
    for form, ok in FORMS:
        body = {"prompt": "Answer:", **SAMPLED, **form}
        routed, direct = _post(router, body), _post(worker.url, body)
        assert routed.status_code == 200, routed.text
        assert routed.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        assert ok(routed.json()["choices"][0]["text"])


def test_the_c_mask_equals_the_bit_layout() -> None:
    import torch

    from kvbaton.engine.structured import apply_token_mask

    gen = torch.Generator().manual_seed(4)
    for vocab in (33, 260, 1000):
        words = (vocab + 31) // 32
        mask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=gen)
        mask[1] = -1  # every token allowed
        logits = torch.randn(3, vocab, generator=gen)
        masked = logits.clone()
        apply_token_mask(masked, mask)
        for r in range(3):
            for t in range(vocab):
                allowed = (int(mask[r, t // 32]) >> (t % 32)) & 1
                assert masked[r, t] == (logits[r, t] if allowed else float("-inf"))


def test_objects_with_listed_properties_are_closed() -> None:
    from kvbaton.models.grammar import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "object"}},
              "items": [{"properties": {"d": {}}, "additionalProperties": True}]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["c"]  # no properties listed: any object
    assert closed["items"][0]["additionalProperties"] is True  # said explicitly: kept
