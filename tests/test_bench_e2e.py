"""`kvbaton bench` end to end: a live tiny-random worker, fake broken servers, and the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from kvbaton.api.server import bind_socket
from kvbaton.bench.load import LoadConfig
from kvbaton.bench.runner import COMPARE_METRICS, BenchConfig, run_bench
from kvbaton.cli import main
from worker_support import running_worker

# Key names shared with `vllm bench serve`'s result JSON.
VLLM_KEYS = {
    "date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "input_lens", "output_lens", "ttfts", "itls", "errors",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99")
      for m in ("ttft", "tpot", "itl", "e2el")),
}
OUR_KEYS = {"prefix_cache_hit_rate", "per_tag", "slo", "workload", "seed"}
SMALL = ["--tokenizer", "tiny-random", "--no-progress", "--input-len", "24", "--output-len", "6"]


@pytest.fixture(scope="module")
def worker_url() -> Iterator[str]:
    with running_worker() as w:
        yield w.url


def bench(*argv: str) -> int:
    return main(["bench", *argv])


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_against_a_live_worker_writes_vllm_compatible_json(worker_url, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench("run", "--base-url", worker_url + "/v1", *SMALL, "--num-prompts", "4",
               "--max-concurrency", "2", "--slo", "ttft=600000,tpot=600000", "--result-file", str(out))
    assert rc == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    r = read(out)
    assert VLLM_KEYS | OUR_KEYS <= set(r)
    assert (r["completed"], r["failed"], r["num_prompts"], r["max_concurrency"]) == (4, 0, 4, 2)
    assert r["model_id"] == "tiny-random" and r["request_rate"] == "inf"
    assert r["output_lens"] == [6] * 4 and r["total_output_tokens"] == 24  # ignore_eos honoured
    assert r["total_input_tokens"] == sum(r["input_lens"]) and min(r["input_lens"]) >= 24
    assert all(0 < t <= e for t, e in zip(r["ttfts"], r["e2els"]))
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["p50_tpot_ms"] > 0
    assert r["request_throughput"] > 0 and r["request_goodput"] == r["request_throughput"]
    assert r["output_throughput"] == pytest.approx(24 / r["duration"])
    assert 0 <= r["prefix_cache_hit_rate"] <= 1
    assert r["workload"]["name"] == "random" and r["run"]["stopped_by"] == "completed"


def test_chat_multi_turn_sends_history_back(worker_url):
    cfg = BenchConfig(base_url=worker_url, endpoint_type="chat", tokenizer="tiny-random",
                      workload="multi-turn", num_prompts=2, progress=False,
                      workload_options={"turns": 2, "user_len": 12, "output_len": 5, "think_time": 0.0},
                      load=LoadConfig(max_concurrency=1))
    r = run_bench(cfg)
    assert r["completed"] == 4 and r["failed"] == 0 and r["backend"] == "openai-chat"
    # One slot: session 0's turns, then session 1's; a second turn carries the first as history.
    assert r["input_lens"][1] > r["input_lens"][0] + 5 and r["input_lens"][3] > r["input_lens"][2] + 5


def test_shared_prefix_run_reports_prefix_cache_hits(worker_url):
    cfg = BenchConfig(base_url=worker_url, tokenizer="tiny-random", workload="shared-prefix",
                      num_prompts=4, progress=False, seed=11,
                      workload_options={"num_prefixes": 1, "prefix_len": 96, "question_len": 8,
                                        "output_len": 3},
                      load=LoadConfig(max_concurrency=1))
    r = run_bench(cfg)
    assert r["completed"] == 4
    assert r["prefix_cache_hit_rate"] > 0.3  # three of four requests find the 96-token prefix


def test_sweep_writes_levels_knee_and_plot(worker_url, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = bench("sweep", "--base-url", worker_url, *SMALL, "--num-prompts", "3",
               "--concurrency", "1,2,3", "--result-file", str(out))
    assert rc == 0
    s = read(out)
    assert s["concurrency"] == [1, 2, 3] and [lv["max_concurrency"] for lv in s["levels"]] == [1, 2, 3]
    assert all(lv["completed"] == 3 for lv in s["levels"])
    assert [lv["seed"] for lv in s["levels"]] == [0, 1, 2]  # fresh prompts per level
    assert s["knee"]["x"] == 2  # three levels: the middle one is the only possible breakpoint
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "knee" in capsys.readouterr().out


def test_compare_interleaves_rounds_and_reports_ratios(worker_url, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = bench("compare", "--target", f"a={worker_url}", "--target", f"b={worker_url}/v1", *SMALL,
               "--num-prompts", "4", "--rounds", "2", "--result-file", str(out))
    assert rc == 0
    c = read(out)
    assert c["rounds"] == 2 and c["order"] == [["a", "b"], ["b", "a"]]
    assert [t["name"] for t in c["targets"]] == ["a", "b"]
    assert all(t["completed"] == 4 and t["failed"] == 0 for t in c["targets"])
    # The baseline against itself: 1 wherever it has a nonzero value, None where it has none (or 0).
    base = c["targets"][0]
    assert c["ratios"]["a"] == {k: 1.0 if base.get(k) else None for k in COMPARE_METRICS}
    assert c["ratios"]["b"]["output_throughput"] > 0
    table = capsys.readouterr().out
    assert "ratio" in table and "output_throughput" in table


# ---- broken servers ----------------------------------------------------------------------

@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port from a thread; always shut down."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="error", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()


def broken_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def fail():
        return JSONResponse({"error": {"message": "the engine is on fire", "type": "server_error"}},
                            status_code=500)

    @app.post("/v1/chat/completions")
    async def stall():
        async def one_chunk_then_silence():
            yield b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
            await asyncio.sleep(60)  # cancelled when the client gives up and disconnects

        return StreamingResponse(one_chunk_then_silence(), media_type="text/event-stream")

    return app


def test_errors_are_counted_and_the_run_ends(tmp_path, capsys):
    out = tmp_path / "r.json"
    with serve(broken_app()) as url:
        rc = bench("run", "--base-url", url, *SMALL, "--num-prompts", "5", "--result-file", str(out))
    assert rc == 1  # nothing succeeded
    r = read(out)
    assert (r["completed"], r["failed"], r["model_id"]) == (0, 5, "fake-model")
    assert r["errors"] == ["HTTP 500: the engine is on fire"]
    assert r["mean_ttft_ms"] is None and r["request_throughput"] == 0
    err = capsys.readouterr().err
    assert "no request succeeded" in err and "Traceback" not in err


def test_a_silent_server_times_out_instead_of_hanging(tmp_path):
    with serve(broken_app()) as url:
        cfg = BenchConfig(base_url=url, endpoint_type="chat", tokenizer="tiny-random", num_prompts=2,
                          progress=False, request_timeout_s=0.5,
                          workload_options={"input_len": 8, "output_len": 4})
        r = run_bench(cfg)
    assert r["completed"] == 0 and r["failed"] == 2
    assert r["errors"][0].startswith("ReadTimeout")


def test_unreachable_server_is_a_clear_error_without_traceback(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the bench connects: nothing listens
    rc = bench("run", "--base-url", f"http://127.0.0.1:{port}", *SMALL, "--num-prompts", "2")
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot reach the server" in err and str(port) in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--slo", "ttft=fast"], "--slo"),
    (["--request-rate", "-2"], "--request-rate"),
    (["--endpoint-type", "grpc"], "--endpoint-type"),
    (["--input-len", "0"], "--input-len"),
    (["--workload", "shared-prefix", "--turns", "3"], "--turns"),
    (["--workload-opt", "bogus=1"], "bogus"),
])
def test_bad_flags_are_argparse_errors_naming_the_flag(argv, needle, capsys):
    # The server is never contacted: flags are checked first (port 9 is discard, nothing listens).
    with pytest.raises(SystemExit) as exc:
        bench("run", "--base-url", "http://127.0.0.1:9", "--tokenizer", "tiny-random", *argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
