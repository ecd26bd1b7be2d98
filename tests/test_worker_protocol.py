"""Pure pieces of the worker's wire format: streamed text deltas and error shaping."""

from __future__ import annotations

from kvbaton.api.protocol import ApiError, CompletionRequest, TextDeltas


def test_text_deltas_without_stop_pass_text_through():
    d = TextDeltas(None)
    assert d.delta("Hel", False) == "Hel"
    assert d.delta("Hello", False) == "lo"
    assert d.delta("Hello", True) == ""
    assert d.sent == "Hello"


def test_text_deltas_hold_back_partial_utf8():
    d = TextDeltas([])
    assert d.delta("ab\ufffd", False) == "ab"  # first byte of a 2-byte character
    assert d.delta("abé", False) == "é"
    assert d.delta("abé\ufffd", True) == "\ufffd"  # a broken byte at the end is released


def test_text_deltas_hold_back_possible_stop_string():
    d = TextDeltas(["END"])
    assert d.delta("abcE", False) == "ab"
    assert d.delta("abcEN", False) == "c"
    # The engine cut the text at the stop string: nothing of it was ever sent.
    assert d.delta("abc", True) == ""
    assert d.sent == "abc"


def test_error_body_shape():
    body = ApiError(400, "max_tokens must be >= 1", "max_tokens", "invalid_value").body()
    assert body == {"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error",
                              "param": "max_tokens", "code": "invalid_value"}}
    assert ApiError(503, "down").body()["error"]["type"] == "server_error"


def test_prompt_forms():
    assert CompletionRequest(prompt="hi").prompt_inputs(4) == ["hi"]
    assert CompletionRequest(prompt=[1, 2]).prompt_inputs(4) == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompt_inputs(4) == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt_inputs(4) == [[1], [2, 3]]
    for bad in (1.5, [True], ["a", [1]], [[1], "a"], [[1], []], [[1, True]], ["a"] * 5, [None]):
        try:
            CompletionRequest(prompt=bad).prompt_inputs(4)
        except ApiError as e:
            assert e.status == 400 and e.param == "prompt"
        else:
            raise AssertionError(f"{bad!r} accepted")
