"""The router: the cluster's OpenAI-compatible front door (tokenize, hash, place, run the
prefill -> decode flow, relay the decode worker's stream). See docs/router.md.

Entry points: :func:`kvbaton.router.server.run_router` (CLI), :class:`RouterThread`
(in-process), :func:`kvbaton.router.config.add_router_args` /
:func:`~kvbaton.router.config.router_config_from_args` (flags).
"""

from kvbaton.router.config import RouterConfig, add_router_args, router_config_from_args
from kvbaton.router.policies import (
    POLICIES,
    NoPrefixOverlap,
    PlacementPolicy,
    PrefixOverlap,
    RoutingRequest,
    make_policy,
    register_policy,
)

__all__ = [
    "POLICIES", "NoPrefixOverlap", "PlacementPolicy", "PrefixOverlap", "RouterConfig", "RoutingRequest",
    "add_router_args", "make_policy", "register_policy", "router_config_from_args",
]
