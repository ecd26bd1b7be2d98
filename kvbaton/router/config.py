"""RouterConfig: the flat, frozen set of knobs of the router, and its command-line flags.

Every field has one flag (``add_router_args``); validation errors name the flag, so the CLI
can hand them to ``parser.error`` unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx

from kvbaton.api.frontdoor import FrontDoorConfig
from kvbaton.cli_args import KV_SECRET_ENV, add_log_level_arg, add_request_timeout_args
from kvbaton.kv.event_stream import check_endpoint
from kvbaton.kv.events import REMOTE_MEDIUM
from kvbaton.kv.index import DEFAULT_REMOTE_TTL_S
from kvbaton.router.policies import POLICIES, PolicyOptions

# Prompts whose uncached part on the chosen decode worker is shorter than this are prefilled by
# the decode worker itself: below it a remote prefill costs the request more (an extra HTTP leg
# and a KV transfer) than the stall it saves the worker's running decodes. Measured by
# benchmarks/disagg_threshold.py (docs/benchmarks.md): on the CPU machine (SmolLM2, one thread per
# worker) the crossover is 11-28 uncached tokens; 32 (two blocks) leaves margin. Re-measure it for
# other hardware: on a GPU prefill is far cheaper per token, so the crossover moves up.
DEFAULT_DISAGG_MIN_TOKENS = 32
DEFAULT_POLICY = "least_load"
ROLES = ("prefill", "decode", "both")

# kv_aware's cache credit per KV medium (the ``medium`` of a worker's BlockStored events): what
# a cached block held there is worth, as a fraction of the same block on the device. Derived as
# credit = max(0, 1 - t_load_per_block / t_prefill_per_block) (docs/router.md, "Tiered KV"):
# on this project's CPU machine both tiers come out at ~0.99 (SmolLM2 prefill ~50 ms per block
# vs a sub-ms load), so these are the GPU numbers (an 8B model at ~10k prefill tokens/s,
# ~1.6 ms per block; a 2 MiB block over PCIe ~0.08 ms -> 0.95, from NVMe ~0.7 ms -> ~0.56,
# from the shared Redis over a ~25 Gbit/s network 2 MiB * 8 / 25e9 ~ 0.67 ms on the wire plus a
# round trip ~0.1 ms, ~0.8 ms -> 1 - 0.8 / 1.6 = 0.5), the case where the tier matters.
# Re-derive them for other hardware.
DEFAULT_KV_MEDIUM_CREDIT: Mapping[str, float] = MappingProxyType({
    "GPU": 1.0, "CPU": 1.0, "device": 1.0,  # our device pool on CUDA / on CPU; events without a medium
    "CPU_TIER": 0.95,  # our host tier
    "DISK": 0.6,  # our disk tier
    REMOTE_MEDIUM: 0.5,  # the remote tier all workers share: every worker can load its blocks
})
# A medium the map does not name (a foreign engine's) counts as held: an unknown tier is more
# likely a fast one than worth penalising every block of.
UNKNOWN_KV_MEDIUM_CREDIT = 1.0


def normalize_worker_url(url: str, flag: str = "--worker") -> str:
    """``http://host:port`` (trailing ``/`` and ``/v1`` dropped); ValueError naming ``flag``."""
    text = url.strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    try:
        parsed = httpx.URL(text)
    except Exception as e:  # httpx raises InvalidURL and friends
        raise ValueError(f"{flag}: invalid URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{flag}: expected http://HOST:PORT, got {url!r}")
    return text


def parse_medium_credit(values: Iterable[str], flag: str = "--kv-medium-credit") -> dict[str, float]:
    """``MEDIUM=W`` items, each value one item or a comma list of them, into {medium: W};
    a medium given again takes its last value. ValueError naming ``flag`` on a malformed item
    (the range of W is checked by :func:`check_medium_credit`)."""
    out: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            name, eq, weight = item.strip().partition("=")
            name = name.strip()
            if not eq or not name:
                raise ValueError(f"{flag}: expected MEDIUM=W[,MEDIUM=W...], got {item.strip()!r}")
            try:
                out[name] = float(weight)
            except ValueError:
                raise ValueError(f"{flag}: {name}: W must be a number in [0, 1], got {weight.strip()!r}") from None
    return out


def check_medium_credit(credit: Mapping[str, float], flag: str = "--kv-medium-credit") -> None:
    """ValueError naming ``flag`` unless every medium is a non-empty name and every credit
    is in [0, 1] (above 1 would make a slow tier beat the device; NaN never compares)."""
    for name, w in credit.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{flag}: medium names must be non-empty strings, got {name!r}")
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"{flag}: {name}: W must be in [0, 1], got {w}")


@dataclass(frozen=True)
class VLLMWorkerSpec:
    """A `vllm serve` worker: its URL; when it publishes KV events (``--kv-events-config``),
    their PUB and replay endpoints; when it runs a vLLM P/D connector (``--kv-transfer-config``,
    e.g. NixlConnector), the legs of disaggregated requests it takes (``role``: prefill,
    decode or both; None: it serves whole requests only)."""

    url: str
    events: str | None = None
    replay: str | None = None
    role: str | None = None

    def __str__(self) -> str:
        opts = (("events", self.events), ("replay", self.replay), ("role", self.role))
        return ",".join([self.url] + [f"{k}={v}" for k, v in opts if v])


VLLM_WORKER_FORMAT = "URL[,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT][,role=prefill|decode|both]"


def parse_vllm_worker(spec: str, flag: str = "--vllm-worker") -> VLLMWorkerSpec:
    """``VLLM_WORKER_FORMAT``; ValueError naming ``flag``."""
    url, *options = [part.strip() for part in spec.split(",")]
    fields: dict[str, str] = {}
    for opt in options:
        name, eq, value = opt.partition("=")
        if not eq or name not in ("events", "replay", "role") or not value:
            raise ValueError(f"{flag}: expected {VLLM_WORKER_FORMAT}, got option {opt!r} in {spec!r}")
        if name in fields:
            raise ValueError(f"{flag}: {name}= given twice in {spec!r}")
        if name == "role":
            if value not in ("prefill", "decode", "both"):
                raise ValueError(f"{flag}: role= must be prefill, decode or both, got {value!r} in {spec!r}")
        else:
            try:
                check_endpoint(f"{flag} {name}", value)
            except ValueError as e:
                raise ValueError(str(e)) from None
        fields[name] = value
    if "replay" in fields and "events" not in fields:
        raise ValueError(f"{flag}: replay= needs events= too, in {spec!r}")
    return VLLMWorkerSpec(normalize_worker_url(url, flag), fields.get("events"), fields.get("replay"),
                          fields.get("role"))


@dataclass(frozen=True)
class RouterConfig(FrontDoorConfig):
    """Settings of one router process (the HTTP API's own, shared with the workers, come from
    :class:`~kvbaton.api.frontdoor.FrontDoorConfig`).

    Workers come from three lists: ``workers`` (role discovered from the worker's
    ``/kv/info``), ``prefill_workers`` and ``decode_workers`` (used only for that role; the
    worker must report that role or ``both``). Timeouts are seconds: ``connect_timeout_s``
    for opening any connection to a worker, ``prefill_timeout_s`` for the whole prefill leg,
    ``request_timeout_s`` for each wait on the decode stream (its first token, then every gap
    between chunks), ``health_timeout_s`` for ``/health``, ``/kv/info``, ``/kv/release``.
    """

    workers: tuple[str, ...] = ()
    prefill_workers: tuple[str, ...] = ()
    decode_workers: tuple[str, ...] = ()
    # `vllm serve` workers, as --vllm-worker specs (URL[,events=...][,replay=...]); stored
    # normalized (see ``vllm_worker_specs``).
    vllm_workers: tuple[str, ...] = ()
    model: str = "smollm2-135m"
    host: str = "127.0.0.1"
    port: int = 8000
    prefill_policy: str = DEFAULT_POLICY
    decode_policy: str = DEFAULT_POLICY
    disagg_min_tokens: int = DEFAULT_DISAGG_MIN_TOKENS
    # kv_aware: what one block still to prefill costs in blocks of decode load (so a cached
    # prefix of k blocks is worth a load margin of prefill_load_scale * k), and the softmax
    # temperature over -cost (0: always the cheapest).
    prefill_load_scale: float = 1.0
    routing_temperature: float = 0.0
    # Seeds the policies' random choices (tie-breaks, temperature sampling), so a run can be
    # repeated exactly; None: a fresh seed per router.
    routing_seed: int | None = None
    # Follow the workers' KV event streams into a prefix index (conditional disaggregation
    # and kv_aware use it); how long a placement counts as cached there before its events.
    kv_events: bool = True
    kv_prediction_ttl_s: float = 2.0
    # kv_aware's cache credit per KV medium, (medium, credit) pairs: those given replace
    # DEFAULT_KV_MEDIUM_CREDIT's for their medium, the others keep the default; stored merged
    # and sorted (a tuple keeps the config hashable; a mapping is accepted too). See
    # ``medium_credit`` and docs/router.md.
    kv_medium_credit: tuple[tuple[str, float], ...] = tuple(sorted(DEFAULT_KV_MEDIUM_CREDIT.items()))
    # How long the index counts a block of the shared remote tier after a worker last stored it
    # there: match the workers' --kv-remote-ttl (the server drops keys without an event).
    kv_remote_ttl_s: float = DEFAULT_REMOTE_TTL_S
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 60.0
    request_timeout_s: float = 60.0
    # Retries of a request that failed before its first token reached the client, each on a
    # decode worker not tried yet.
    max_retries: int = 1
    # Sent as 'Authorization: Bearer ...' to workers started with --api-key.
    worker_api_key: str | None = field(default=None, repr=False)
    # The cluster's KV secret: follows workers whose KV event streams it encrypts.
    kv_secret: str | None = field(default=None, repr=False)  # (secrets stay out of reprs and logs)

    def __post_init__(self) -> None:
        super().__post_init__()
        seen: set[str] = set()
        lists = (("workers", "--worker"), ("prefill_workers", "--prefill"), ("decode_workers", "--decode"))
        for name, flag in lists:
            urls = tuple(normalize_worker_url(u, flag) for u in getattr(self, name))
            for u in urls:
                if u in seen:
                    raise ValueError(f"{flag}: worker {u} is listed twice")
                seen.add(u)
            object.__setattr__(self, name, urls)
        vllm = [parse_vllm_worker(spec) for spec in self.vllm_workers]
        for v in vllm:
            if v.url in seen:
                raise ValueError(f"--vllm-worker: worker {v.url} is listed twice")
            seen.add(v.url)
        object.__setattr__(self, "vllm_workers", tuple(str(v) for v in vllm))
        if not seen:
            raise ValueError("--worker: at least one worker URL is required (or --prefill/--decode/--vllm-worker)")
        if not self.workers and not self.decode_workers and not any(v.role != "prefill" for v in vllm):
            raise ValueError("--decode: at least one decode-capable worker (--worker or --decode) is required")
        for name, flag in (("prefill_policy", "--prefill-policy"), ("decode_policy", "--decode-policy")):
            value = getattr(self, name)
            if value not in POLICIES:
                raise ValueError(f"{flag}: unknown policy {value!r} (known: {', '.join(sorted(POLICIES))})")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port: must be in [0, 65535], got {self.port}")
        if self.disagg_min_tokens < 0:
            raise ValueError(f"--disagg-min-tokens: must be >= 0, got {self.disagg_min_tokens}")
        if not (self.prefill_load_scale >= 0 and math.isfinite(self.prefill_load_scale)):
            raise ValueError(f"--prefill-load-scale: must be a finite number >= 0, got {self.prefill_load_scale}")
        if not (self.routing_temperature >= 0 and math.isfinite(self.routing_temperature)):
            raise ValueError(f"--routing-temperature: must be a finite number >= 0, got {self.routing_temperature}")
        if not self.kv_prediction_ttl_s > 0:
            raise ValueError(f"--kv-prediction-ttl: must be > 0, got {self.kv_prediction_ttl_s}")
        if not self.kv_remote_ttl_s > 0:
            raise ValueError(f"--kv-remote-ttl: must be > 0, got {self.kv_remote_ttl_s}")
        given = self.kv_medium_credit
        pairs = given.items() if isinstance(given, Mapping) else given
        credit = dict(DEFAULT_KV_MEDIUM_CREDIT)
        try:
            credit.update((str(name), float(w)) for name, w in pairs)
        except (TypeError, ValueError):
            raise ValueError(f"--kv-medium-credit: expected (medium, credit) pairs, got {given!r}") from None
        check_medium_credit(credit)
        object.__setattr__(self, "kv_medium_credit", tuple(sorted(credit.items())))
        if self.max_retries < 0:
            raise ValueError(f"--max-retries: must be >= 0, got {self.max_retries}")
        positive = (
            ("health_interval_s", "--health-interval"), ("health_timeout_s", "--health-timeout"),
            ("connect_timeout_s", "--connect-timeout"), ("prefill_timeout_s", "--prefill-timeout"),
            ("request_timeout_s", "--request-timeout"),
        )
        for name, flag in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag}: must be > 0, got {getattr(self, name)}")

    def worker_specs(self) -> list[tuple[str, str | None]]:
        """(url, declared role or None) for every worker, in flag order."""
        specs: list[tuple[str, str | None]] = [(u, None) for u in self.workers]
        specs += [(u, "prefill") for u in self.prefill_workers]
        specs += [(u, "decode") for u in self.decode_workers]
        return specs

    def vllm_worker_specs(self) -> list[VLLMWorkerSpec]:
        """The `vllm serve` workers, in flag order."""
        return [parse_vllm_worker(spec) for spec in self.vllm_workers]

    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(self.prefill_load_scale, self.routing_temperature, self.routing_seed)

    @property
    def medium_credit(self) -> dict[str, float]:
        """kv_aware's cache credit per KV medium (defaults merged with ``--kv-medium-credit``);
        mediums not in it get ``UNKNOWN_KV_MEDIUM_CREDIT``."""
        return dict(self.kv_medium_credit)

    @property
    def model_names(self) -> list[str]:
        """The names the API accepts in ``model``: the served name first, then ``model``."""
        return list(dict.fromkeys(n for n in (self.served_model_name, self.model) if n))


def add_router_args(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """Add the router's flags to ``parser``.

    ``common=False`` leaves out the flags a combined command (``kvbaton serve``) already has
    for its workers: ``--model``, ``--host``, ``--port``, ``--api-key``,
    ``--served-model-name``, ``--max-request-bytes``, ``--drain-timeout``, ``--log-level``,
    and the worker lists; pass their values to ``router_config_from_args`` as overrides.
    """
    if common:
        parser.add_argument("--worker", action="append", default=[], metavar="URL",
                            help="a worker (role from its /kv/info); repeatable")
        parser.add_argument("--prefill", action="append", default=[], metavar="URL",
                            help="a worker used only for prefill legs; repeatable")
        parser.add_argument("--decode", action="append", default=[], metavar="URL",
                            help="a worker used only for decode legs; repeatable")
        parser.add_argument("--vllm-worker", action="append", default=[], metavar=VLLM_WORKER_FORMAT,
                            help="a `vllm serve` worker; events=: its --kv-events-config endpoints "
                                 "(kv_aware then sees its prefix cache); role=: the legs it takes when it "
                                 "runs a vLLM P/D connector (--kv-transfer-config); repeatable")
        parser.add_argument("--model", default="smollm2-135m",
                            help="tokenizer/chat template source, as for workers: built-in name, .gguf or HF dir")
        parser.add_argument("--served-model-name", default=None,
                            help="another name the API accepts in the 'model' field")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
        parser.add_argument("--api-key", default=None,
                            help="require 'Authorization: Bearer KEY' (/health and /metrics stay open)")
        parser.add_argument("--max-request-bytes", type=int, default=8 << 20)
        parser.add_argument("--drain-timeout", type=float, default=5.0,
                            help="seconds in-flight requests may finish after SIGTERM")
        add_log_level_arg(parser)
        add_request_timeout_args(parser)
        parser.add_argument("--no-kv-events", action="store_true",
                            help="do not follow the workers' KV events (no prefix index: kv_aware "
                                 "and conditional disaggregation see no cache)")
        # serve: its workers' flag of the same name sets both
        parser.add_argument("--kv-remote-ttl", type=float, default=DEFAULT_REMOTE_TTL_S, metavar="S",
                            help="seconds the prefix index counts a block of the shared remote KV tier "
                                 "after a worker last stored it there: match the workers' --kv-remote-ttl")
    names = ", ".join(sorted(POLICIES))
    parser.add_argument("--policy", default=None, help=f"placement policy for both legs ({names})")
    parser.add_argument("--prefill-policy", default=None, help=f"policy for prefill legs (default {DEFAULT_POLICY})")
    parser.add_argument("--decode-policy", default=None, help=f"policy for decode legs (default {DEFAULT_POLICY})")
    parser.add_argument("--prefill-load-scale", type=float, default=1.0,
                        help="kv_aware: cost of one prompt block still to prefill, in blocks of decode "
                             "load (a worker holding k more cached blocks wins unless its active "
                             "blocks exceed the other's by scale*k)")
    parser.add_argument("--routing-temperature", type=float, default=0.0,
                        help="kv_aware: 0 picks the cheapest worker; >0 samples softmax(-cost/T)")
    parser.add_argument("--routing-seed", type=int, default=None,
                        help="seed of the policies' random tie-breaks and sampling (repeatable runs)")
    parser.add_argument("--kv-prediction-ttl", type=float, default=2.0,
                        help="seconds a placement counts as cached on its worker before the "
                             "worker's KV events confirm it (sibling requests follow it)")
    defaults = ",".join(f"{k}={v:g}" for k, v in DEFAULT_KV_MEDIUM_CREDIT.items())
    parser.add_argument("--kv-medium-credit", action="append", default=[], metavar="MEDIUM=W[,MEDIUM=W...]",
                        help="kv_aware: what a cached block in KV medium MEDIUM is worth, W in [0, 1] "
                             f"(1 = as good as on the device); repeatable. Defaults {defaults}, other "
                             f"mediums {UNKNOWN_KV_MEDIUM_CREDIT:g}. vLLM workers' CPU medium is their "
                             "offload tier: give CPU=0.95")
    parser.add_argument("--disagg-min-tokens", type=int, default=DEFAULT_DISAGG_MIN_TOKENS,
                        help="prefill remotely only when at least this many prompt tokens are uncached "
                             "on the chosen decode worker")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between worker /health polls")
    parser.add_argument("--health-timeout", type=float, default=1.0,
                        help="timeout of /health, /kv/info and /kv/release calls")
    parser.add_argument("--connect-timeout", type=float, default=2.0, help="timeout to connect to a worker")
    parser.add_argument("--prefill-timeout", type=float, default=60.0, help="timeout of a whole prefill leg")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="longest wait for the decode worker's first token and between its chunks")
    parser.add_argument("--max-retries", type=int, default=1,
                        help="retries on another decode worker before the first token reached the client")
    parser.add_argument("--worker-api-key", default=None, help="bearer token the router sends to workers")
    if common:  # serve passes its workers' secret itself
        parser.add_argument("--kv-secret", default=os.environ.get(KV_SECRET_ENV),
                            help="the cluster's KV secret (default $KVBATON_KV_SECRET): needed to follow "
                                 "workers whose KV events it encrypts")


def router_config_from_args(args: argparse.Namespace, **overrides: Any) -> RouterConfig:
    """The RouterConfig of parsed flags; ``overrides`` replace fields (e.g. the worker URLs
    ``serve`` started). ValueError names the offending flag."""
    if args.policy is not None and (args.prefill_policy or args.decode_policy):
        raise ValueError("--policy: give either --policy or --prefill-policy/--decode-policy, not both")
    kw: dict[str, Any] = dict(
        prefill_policy=args.policy or args.prefill_policy or DEFAULT_POLICY,
        decode_policy=args.policy or args.decode_policy or DEFAULT_POLICY,
        disagg_min_tokens=args.disagg_min_tokens,
        prefill_load_scale=args.prefill_load_scale,
        routing_temperature=args.routing_temperature,
        routing_seed=args.routing_seed,
        kv_prediction_ttl_s=args.kv_prediction_ttl,
        kv_medium_credit=tuple(parse_medium_credit(args.kv_medium_credit).items()),
        health_interval_s=args.health_interval,
        health_timeout_s=args.health_timeout,
        connect_timeout_s=args.connect_timeout,
        prefill_timeout_s=args.prefill_timeout,
        request_timeout_s=args.request_timeout,
        max_retries=args.max_retries,
        worker_api_key=args.worker_api_key,
    )
    common = dict(
        workers="worker", prefill_workers="prefill", decode_workers="decode", vllm_workers="vllm_worker",
        model="model",
        served_model_name="served_model_name", host="host", port="port", api_key="api_key",
        max_request_bytes="max_request_bytes", drain_timeout_s="drain_timeout", log_level="log_level",
        request_header_timeout_s="request_header_timeout", request_body_timeout_s="request_body_timeout",
        kv_secret="kv_secret", kv_remote_ttl_s="kv_remote_ttl",
    )
    for name, attr in common.items():
        if hasattr(args, attr):
            value = getattr(args, attr)
            kw[name] = tuple(value) if isinstance(value, list) else value
    if hasattr(args, "no_kv_events"):  # serve: the workers' flag also turns the index off
        kw["kv_events"] = not args.no_kv_events
    kw.update(overrides)
    return RouterConfig(**kw)
