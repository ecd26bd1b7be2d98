"""No request can take the engine down: sampling values that used to crash the engine loop are
refused or sampled safely, a step whose forward pass or sampling raises fails only its own
requests (HTTP 500) and the engine serves on, and a worker whose engine loop dies anyway exits
non-zero instead of answering 503 for ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import make_llm, wait_until
from kvbaton import SamplingParams
from kvbaton.engine.sampler import sample
from kvbaton.errors import InvalidRequestError
from worker_support import engine_debug, running_worker, wait_idle

POISON = [7, 7, 7, 7, 7]  # a prompt the injected fault recognises


def _fault_on(engine: Any, marker: list[int]) -> None:
    """Make the engine's forward pass raise for any step that runs a request whose prompt starts
    with ``marker`` (a stand-in for a kernel or model error that one batch triggers)."""
    real = engine.runner.execute

    def execute(out: Any) -> Any:
        if any(s.request.prompt_token_ids[: len(marker)] == marker for s in out.scheduled):
            raise RuntimeError("injected forward failure")
        return real(out)

    engine.runner.execute = execute


# ---- sampling values ------------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [1e-46, 1e-45, 5e-324])
def test_top_p_below_float32_keeps_the_most_likely_token(top_p: float) -> None:
    # top_p rounds to 0 in float32; every token used to be dropped (NaN probabilities, and
    # torch.multinomial raised on the engine thread).
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.7, top_p=top_p)] * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    res = sample(logits, params, gens)
    assert res.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_temperature_is_refused(value: float) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(temperature=value)
    assert e.value.param == "temperature"


def test_top_p_below_float32_over_http_samples_the_top_token() -> None:
    with running_worker() as w:
        r = httpx.post(f"{w.url}/v1/completions", timeout=60,
                       json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1.0, "top_p": 1e-46})
        assert r.status_code == 200, r.text
        greedy = httpx.post(f"{w.url}/v1/completions", timeout=60,
                            json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        assert httpx.get(f"{w.url}/health", timeout=10).status_code == 200


# ---- a failing step -------------------------------------------------------------------------


def test_failed_step_fails_only_its_requests_and_frees_their_blocks() -> None:
    llm = make_llm(max_num_seqs=8)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    innocent = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    want = make_llm().generate([innocent], params)[0].token_ids
    _fault_on(eng, POISON)
    rid_poison = eng.add_request(POISON + [1, 2, 3], params)
    rid_batched = eng.add_request(innocent, params)  # shares the failing step: fails with it
    outs = {o.request_id: o for o in eng.step()}
    assert set(outs) == {rid_poison, rid_batched}
    for o in outs.values():
        assert o.finished and o.finish_reason == "error"
        assert o.error is not None and "injected forward failure" in o.error
        assert o.token_ids == []
    assert not eng.has_unfinished_requests()
    assert eng.pool.num_used_blocks == 0
    assert eng.stats()["num_failed_steps"] == 1
    eng.check_integrity()
    # The engine goes on: a later request runs exactly as on a fresh engine.
    again = llm.generate([innocent], params)[0]
    assert again.finish_reason == "length" and again.token_ids == want
    eng.check_integrity()


def test_failed_step_over_http_is_a_500_and_the_worker_serves_on() -> None:
    with running_worker() as w:
        _fault_on(w.state.engine.engine, POISON)
        url = f"{w.url}/v1/completions"
        r = httpx.post(url, json={"prompt": POISON, "max_tokens": 3}, timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_step_failed" and err["type"] == "server_error"
        assert "injected forward failure" in err["message"]
        with httpx.stream("POST", url, json={"prompt": POISON, "max_tokens": 3, "stream": True},
                          timeout=60) as s:
            assert s.status_code == 200
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_step_failed"
        # Health stays green and the next request is served.
        assert httpx.get(f"{w.url}/health", timeout=10).status_code == 200
        ok = httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
        state = wait_idle(w.url, 0)
        assert state["stats"]["num_failed_steps"] == 2
        metrics = httpx.get(f"{w.url}/metrics", timeout=10).text
        assert 'kvbaton:request_success_total{finished_reason="error",model_name="tiny-random"} 2.0' in metrics
        assert engine_debug(w.url)["integrity_error"] is None


# ---- a dead engine loop ---------------------------------------------------------------------

_DYING_WORKER = textwrap.dedent("""
    import sys
    from kvbaton.engine.config import EngineConfig
    from kvbaton.engine.scheduler import Scheduler
    from kvbaton.worker.config import WorkerConfig
    from kvbaton.worker.server import run_worker

    real = Scheduler.schedule

    def schedule(self):
        # A fault outside the contained part of a step: the engine loop cannot go on.
        if any(r.prompt_token_ids[:5] == [7, 7, 7, 7, 7] for r in self.waiting):
            raise RuntimeError("injected scheduler failure")
        return real(self)

    Scheduler.schedule = schedule
    code = run_worker(EngineConfig(model="tiny-random", num_kv_blocks=64),
                      WorkerConfig(port=0, drain_timeout_s=2),
                      announce=lambda line: print(line, flush=True))
    sys.exit(code)
""")


def test_worker_whose_engine_loop_dies_exits_non_zero(tmp_path: Path) -> None:
    script = tmp_path / "dying_worker.py"
    script.write_text(_DYING_WORKER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": POISON, "max_tokens": 3}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        wait_until(lambda: proc.poll() is not None, 60, "the worker to exit")
        assert proc.returncode == 1  # it used to stay up, answering 503
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
