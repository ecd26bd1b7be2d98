"""Argument-parser pieces every kvbaton command shares (torch-free: the router's CLI uses them).

One definition of ``--log-level`` and of how ``--help`` shows defaults, so ``kvbaton worker``,
``router``, ``serve``, ``generate`` and ``bench`` behave alike.
"""

from __future__ import annotations

import argparse

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Environment variables `kvbaton worker` reads, and `kvbaton serve` (LocalCluster) sets for the
# workers it starts, so secrets never show on a command line:
KV_SECRET_ENV = "KVBATON_KV_SECRET"  # the KV transfer plane's shared secret (--kv-secret)
WORKER_API_KEY_ENV = "KVBATON_API_KEY"  # the worker's --api-key
PARENT_PID_ENV = "KVBATON_PARENT_PID"  # die with this parent (a parent-death signal)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends each option's default to its help, unless the
    default is None or False (nothing to show) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                or "default" in text.lower() or isinstance(default, list)):
            return action.help
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)} (any case), got {value!r}")
    return level


def add_log_level_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--log-level LEVEL``: a bad level is a usage error naming the flag, not a traceback."""
    parser.add_argument("--log-level", type=_log_level, default="WARNING", metavar="LEVEL",
                        help=f"log level: {', '.join(LOG_LEVELS)}")


def add_request_timeout_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How long a client may take to send a request (worker, router and serve alike)."""
    parser.add_argument("--request-header-timeout", type=float, default=10.0, metavar="S",
                        help="seconds a new connection may take to send its first request's headers "
                             "before it is closed")
    parser.add_argument("--request-body-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a request's body may take to arrive before the answer is 408")
