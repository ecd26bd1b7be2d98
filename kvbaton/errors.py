"""Typed errors that cross layers, so no caller recognises an error by its message text.

A reworded message never changes an HTTP status, a field named in an error body, a CLI flag or
a retry decision: those are decided from the type and the attributes here.

- :class:`InvalidRequestError`: a request that can never run as given (a bad sampling field,
  a prompt that does not fit). The engine and :class:`~kvbaton.sampling_params.SamplingParams`
  raise it; the HTTP API answers 400 naming ``param``, the field the client sent.
- :class:`ConfigError`: a setting that cannot work. ``field`` is the config field; the CLI
  names its flag (``--max-num-seqs``) from it.

Both subclass ``ValueError``, so code that only needs "bad value" keeps catching that.
"""

from __future__ import annotations

INVALID_VALUE = "invalid_value"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def _join(name: str | None, reason: str) -> str:
    if not name:
        return reason
    return f"{name}{reason}" if reason[:1] in (":", "[") else f"{name} {reason}"


class InvalidRequestError(ValueError):
    """A request that can never run as given.

    ``param`` is the offending field in the engine's terms (``prompt``, ``max_tokens``,
    ``temperature``, ``messages``...), ``reason`` the rest of the message (it reads after the
    field name: ``"must be >= 0, got -1"``), and ``code`` an OpenAI-style error code.
    """

    def __init__(self, param: str | None, reason: str, code: str = INVALID_VALUE) -> None:
        self.param = param
        self.reason = reason
        self.code = code
        super().__init__(_join(param, reason))

    def message_for(self, name: str | None) -> str:
        """The message naming the field ``name`` (the client's alias of ``param``)."""
        return _join(name, self.reason)


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit the context or the cache."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(param, reason, CONTEXT_LENGTH_EXCEEDED)


class ConfigError(ValueError):
    """A setting that cannot work; ``field`` is the config field it belongs to."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(_join(field, reason))

    @property
    def flag(self) -> str:
        """The command-line flag of ``field`` (``max_num_seqs`` -> ``--max-num-seqs``)."""
        return "--" + self.field.replace("_", "-")
