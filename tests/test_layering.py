"""The package map holds at import time: the router process never loads torch or the engine
(it only tokenizes and routes), and the shared HTTP front door depends on neither side."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
{imports}
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "kvbaton.")))))
"""


def _loaded(imports: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forbidden(mods: list[str], *prefixes: str) -> list[str]:
    return [m for m in mods if m == "torch" or m.startswith("torch.") or m.startswith(prefixes)]


def test_importing_the_router_loads_neither_torch_nor_the_engine_nor_the_worker() -> None:
    mods = _loaded("import kvbaton.router, kvbaton.router.app, kvbaton.router.server, "
                   "kvbaton.router.local_cluster")
    assert "kvbaton.router.app" in mods  # the probe imported what it claims
    assert _forbidden(mods, "kvbaton.engine", "kvbaton.worker", "kvbaton.models.llama") == []


def test_a_router_app_with_its_tokenizer_stays_torch_free() -> None:
    mods = _loaded(
        "from kvbaton.router.app import create_app\n"
        "from kvbaton.router.config import RouterConfig\n"
        "app = create_app(RouterConfig(workers=('http://127.0.0.1:9',), model='tiny-random'))\n"
        "assert app.state.router.frontend.tokenizer.encode('hi', add_special_tokens=False)"
    )
    assert "kvbaton.router.frontend" in mods
    assert _forbidden(mods, "kvbaton.engine", "kvbaton.worker") == []


@pytest.mark.slow
def test_the_bundled_models_tokenizer_loads_without_torch() -> None:
    mods = _loaded("from kvbaton.models.sources import tokenizer_for_model\n"
                   "assert tokenizer_for_model('smollm2-135m').encode('Paris')")
    assert _forbidden(mods, "kvbaton.engine") == []


def test_the_front_door_depends_on_neither_side() -> None:
    mods = _loaded("import kvbaton.api.frontdoor, kvbaton.api.server, kvbaton.api.sse, kvbaton.api.guard, "
                   "kvbaton.limits, kvbaton.sampling_params")
    assert _forbidden(mods, "kvbaton.engine", "kvbaton.worker", "kvbaton.router", "kvbaton.models") == []


def test_the_engines_bookkeeping_imports_without_torch() -> None:
    """The scheduler, block pool, leases, KV import and stop rule: what a simulator drives."""
    mods = _loaded("import kvbaton.engine.scheduler, kvbaton.engine.block_pool, kvbaton.engine.kv_handoff, "
                   "kvbaton.engine.stop, kvbaton.engine.request, kvbaton.router.placement")
    assert "kvbaton.engine.scheduler" in mods
    assert _forbidden(mods, "kvbaton.engine.engine", "kvbaton.engine.model_runner") == []
