"""The command line as a new user meets it: `--version`, defaults in `--help`, and a bad
`--log-level` is a usage error naming the flag (it used to be a traceback)."""

from __future__ import annotations

import pytest

from kvbaton import __version__
from kvbaton.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvbaton {__version__}"


@pytest.mark.parametrize("command", ["worker", "router", "serve", "generate", "bench run"])
def test_bad_log_level_is_a_usage_error_naming_the_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["x"] if command == "generate" else []
    with pytest.raises(SystemExit) as e:
        main([*command.split(), *extra, "--log-level", "LOUD"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--log-level" in err and "LOUD" in err and "Traceback" not in err


def test_log_level_takes_any_case() -> None:
    from kvbaton.cli import build_parser

    args = build_parser().parse_args(["worker", "--log-level", "info"])
    assert args.log_level == "INFO"


@pytest.mark.parametrize("command, flag, default", [
    ("worker", "--port", "8100"),
    ("serve", "--port", "8000"),
    ("worker", "--log-level", "WARNING"),
    ("router", "--drain-timeout", "5.0"),
])
def test_help_shows_defaults(command: str, flag: str, default: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    # The option's entry: its line and the wrapped help lines under it, up to the next option.
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{flag} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("-")), len(lines))
    entry = " ".join(" ".join(lines[start:end]).split())
    assert f"(default: {default})" in entry, entry


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_prefill_or_decode_worker_without_a_transfer_secret_is_refused(
        role: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a secret a decode worker would store blocks from any server a handle names.
    monkeypatch.delenv("KVBATON_KV_SECRET", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["worker", "--role", role, "--model", "tiny-random"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-secret" in err and "--insecure-transfer" in err


def test_transfer_secret_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from kvbaton.cli import _transfer_secret, build_parser

    monkeypatch.delenv("KVBATON_KV_SECRET", raising=False)
    parser = build_parser()

    def secret(*argv: str) -> str | None:
        args = parser.parse_args(["worker", *argv])
        return _transfer_secret(args, argparse.ArgumentParser(), args.role)

    assert secret("--role", "decode", "--kv-secret", "k") == "k"
    assert secret("--role", "decode", "--insecure-transfer") is None
    # A 'both' worker without one gets its own random secret: it admits no peer.
    a, b = secret("--role", "both"), secret("--role", "both")
    assert a and b and a != b


@pytest.mark.parametrize("command", ["worker", "router"])
def test_a_bad_request_timeout_is_a_usage_error_naming_the_flag(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--worker", "http://127.0.0.1:9"] if command == "router" else []
    with pytest.raises(SystemExit) as e:
        main([command, *extra, "--model", "tiny-random", "--request-body-timeout", "0"])
    assert e.value.code == 2
    assert "--request-body-timeout" in capsys.readouterr().err
