"""The front door both the worker and the router serve: the settings of their OpenAI API, and
the one preamble every request goes through before either side does its own work.

The preamble checks the fields the engine cannot honour, resolves the model name, builds the
engine's :class:`~kvbaton.sampling_params.SamplingParams` (so a bad field is a 400 naming the
field the client sent, on the router exactly as on a worker) and applies the ``max_tokens``
defaults. Engine-side errors arrive typed (:class:`~kvbaton.errors.InvalidRequestError`) and
become 400s here by their ``param`` and ``code``, never by their message text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kvbaton.api.fanout import Fanout
from kvbaton.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields
from kvbaton.api.tools import Tool, constraint, parse_tool_choice, parse_tools, render, template_tools
from kvbaton.errors import ConfigError, InvalidRequestError
from kvbaton.limits import check_prompt_chars
from kvbaton.sampling_params import SamplingParams, StructuredOutput


@dataclass(frozen=True)
class FrontDoorConfig:
    """Settings of the OpenAI-compatible HTTP API, shared by ``WorkerConfig`` and
    ``RouterConfig`` (both subclass it).

    ``api_key``: when set, every route but ``/health`` and ``/metrics`` needs
    ``Authorization: Bearer KEY``. Chat requests without ``max_tokens`` generate at most
    ``default_chat_max_tokens`` (and never past the context or the KV cache); completions
    default to ``default_completion_max_tokens``, as OpenAI's do.
    """

    api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    max_request_bytes: int = 8 << 20
    # Seconds in-flight requests may keep running after SIGTERM.
    drain_timeout_s: float = 5.0
    max_logprobs: int = 20
    max_n: int = 16
    max_batch_prompts: int = 64
    default_chat_max_tokens: int = 1024
    default_completion_max_tokens: int = 16
    log_level: str = "WARNING"
    # A new connection must send its first request's headers within this; a request's body
    # must arrive whole within the other (slow or stalled clients get closed / 408).
    request_header_timeout_s: float = 10.0
    request_body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes", "must be >= 1024")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")
        if self.max_logprobs < 0:
            raise ConfigError("max_logprobs", "must be >= 0")
        for name in ("max_n", "max_batch_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)!r}")
        for name in ("request_header_timeout_s", "request_body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)!r}")
        for name in ("default_chat_max_tokens", "default_completion_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be >= 1")


def resolve_model(name: str | None, served: list[str], server: str) -> str:
    """The model name a response echoes: ``name`` if this server serves it (None: the first of
    ``served``); a 404 naming what it serves otherwise."""
    if name is None or name in served:
        return name or served[0]
    raise ApiError(404, f"model {name!r} does not exist; this {server} serves {served}", "model",
                   "model_not_found")


def invalid_request(e: InvalidRequestError, aliases: dict[str, str], prompt_param: str) -> ApiError:
    """The 400 for an engine or sampling error: ``param`` mapped to the field the client sent
    (``prompt`` is ``messages`` for chat; ``max_tokens`` may be ``max_completion_tokens``)."""
    param = prompt_param if e.param == "prompt" else e.param
    if param is not None:
        param = aliases.get(param, param)
    return ApiError(400, e.message_for(param), param, e.code)


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: int | None, aliases: dict[str, str],
    prompt_param: str, prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's SamplingParams for ``body``; a 400 naming the field the client sent."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.logit_bias_ids(),
            min_tokens=body.min_tokens or 0,
            prompt_logprobs=prompt_logprobs,
            structured=body.structured_output(),
        )
    except InvalidRequestError as e:
        raise invalid_request(e, aliases, prompt_param) from None


@dataclass
class Preamble:
    """A request that passed the front door.

    Exactly one of ``prompt`` (completions: text or token ids) and ``messages`` (chat) is set.
    ``max_tokens`` is None for a chat request that gave none: the default then depends on the
    prompt's length, known once it is tokenized (:func:`kvbaton.limits.default_max_tokens`);
    ``params.max_tokens`` holds 1 until then. ``aliases`` map engine field names to the
    ones the client sent, and ``prompt_param`` is the field that holds the prompt, for
    error messages.
    """

    model: str
    params: SamplingParams
    max_tokens: int | None
    logprobs: int | None
    prompt_param: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    # Completions: every prompt of a batch (``prompt`` is the first); chat: empty.
    prompts: list[str | list[int]] = field(default_factory=list)
    fan: Fanout = Fanout(1, 1, 1)
    # Chat with tools: the tools, the tool_choice (none, auto, required or a function's name),
    # and, for auto, the grammar that only checks the tools' schemas compile.
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "none"
    tool_check: StructuredOutput | None = None
    # Chat with tools and a template that renders them: the declarations it is given.
    template_tools: list[dict[str, Any]] | None = None
    # Completions with echo and max_tokens 0 (prompt scoring, as lm-eval-harness asks): the
    # engine runs one token, which the response leaves out (params.max_tokens is 1).
    prompt_only: bool = False

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the output is parsed for tool calls (tools given, tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def constraint_to_check(self) -> StructuredOutput | None:
        """What the server compiles before running the request: the output's constraint, or
        the tools' schemas."""
        return self.params.structured or self.tool_check

    def error(self, e: InvalidRequestError) -> ApiError:
        """The 400 for an error the engine raised about this request."""
        return invalid_request(e, self.aliases, self.prompt_param)

    def check_length_before_tokenizing(self, max_model_len: int | None, token_chars: int) -> None:
        """The 400 for text too long for the context whatever it says (:func:`~kvbaton.limits.
        check_prompt_chars`), before a tokenizer spends seconds on megabytes of it; worker and
        router both call it first."""
        if self.messages is not None:
            counts = [sum(len(m.get("content") or "") for m in self.messages)]
        else:  # token ids are counted exactly, later
            counts = [len(p) for p in self.prompts if isinstance(p, str)]
        try:
            for chars in counts:
                check_prompt_chars(chars, max_model_len, token_chars)
        except InvalidRequestError as e:
            raise self.error(e) from None


def _check_prompt_logprobs(body: SamplingFields, max_logprobs: int) -> None:
    if body.prompt_logprobs is not None and body.prompt_logprobs > max_logprobs:
        raise ApiError(400, f"prompt_logprobs: at most {max_logprobs}", "prompt_logprobs", "invalid_value")


def completion_preamble(cfg: FrontDoorConfig, served: list[str], server: str,
                        body: CompletionRequest) -> Preamble:
    """``POST /v1/completions`` up to the point where worker and router part ways."""
    body.check_supported(cfg.max_n)
    name = resolve_model(body.model, served, server)
    prompts = body.prompt_inputs(cfg.max_batch_prompts)
    if body.logprobs is not None and body.logprobs > cfg.max_logprobs:
        raise ApiError(400, f"logprobs: at most {cfg.max_logprobs}", "logprobs", "invalid_value")
    _check_prompt_logprobs(body, cfg.max_logprobs)
    max_tokens = cfg.default_completion_max_tokens if body.max_tokens is None else body.max_tokens
    prompt_only = body.echo and max_tokens == 0
    if prompt_only:
        max_tokens = 1
    prompt_lp = body.prompt_logprobs
    if body.echo and body.logprobs is not None:  # echo shows the prompt's logprobs too
        prompt_lp = max(prompt_lp or 0, body.logprobs)
    params = sampling_params(body, max_tokens, body.logprobs, {}, "prompt", prompt_lp)
    fan = Fanout(len(prompts), body.n, body.best_of or body.n)
    return Preamble(name, params, max_tokens, body.logprobs, "prompt", prompt=prompts[0],
                    prompts=prompts, fan=fan, prompt_only=prompt_only)


def chat_preamble(cfg: FrontDoorConfig, served: list[str], server: str,
                  body: ChatCompletionRequest, native_tools: bool = False) -> Preamble:
    """``POST /v1/chat/completions`` up to the point where worker and router part ways."""
    body.check_supported(cfg.max_n)
    name = resolve_model(body.model, served, server)
    tools = parse_tools(body.tools) if body.tools is not None else []
    choice = parse_tool_choice(body.tool_choice, tools)
    messages = render(body.template_input(), tools, choice, native_tools)
    max_tokens, logprobs, aliases = body.limits(cfg.max_logprobs)
    _check_prompt_logprobs(body, cfg.max_logprobs)
    params = sampling_params(body, 1 if max_tokens is None else max_tokens, logprobs, aliases, "messages",
                             body.prompt_logprobs)
    check = None
    if choice not in ("none", "auto"):  # required, or a named function: the output is calls
        if params.structured is not None:
            raise ApiError(400, f"tool_choice: {body.tool_choice!r} constrains the output to tool calls; "
                           f"it cannot be combined with {params.structured.param}", "tool_choice",
                           "invalid_value")
        params = replace(params, structured=constraint(tools, choice, body.parallel_tool_calls is not False))
    elif tools:
        check = constraint(tools, "auto")
    return Preamble(name, params, max_tokens, logprobs, "messages", messages=messages, aliases=aliases,
                    fan=Fanout(1, body.n, body.n), tools=tools, tool_choice=choice, tool_check=check,
                    template_tools=template_tools(tools, choice) if native_tools else None)
