"""Record what a real `vllm serve` (vLLM's CPU build) sends a router: its KV event stream (raw
ZMQ frames, live and by replay), `/metrics`, `/v1/models`, `/tokenize` and a streamed
completion, into the JSON files the unit tests of `kvbaton.kv.vllm_events` and the router's
vLLM worker kind read (``tests/data/vllm/``).

The requests are chosen to make every event kind appear: prompts whose full blocks are stored,
the same prefix again (a hit, no new store for it), a salted prompt (``cache_salt`` goes into
the first block's ``extra_keys``), then enough distinct prompts to overflow a deliberately small
KV cache (``--num-gpu-blocks-override``), which evicts (``BlockRemoved``), and finally a
prefix-cache reset (``AllBlocksCleared``; needs vLLM's dev mode). It creates vLLM's virtual
environment like benchmarks/vs_vllm_cpu.py. Not a test: CI never installs vLLM.

    python benchmarks/vllm_capture.py --hashes int   --out tests/data/vllm/events_int.json
    python benchmarks/vllm_capture.py --hashes bytes --out tests/data/vllm/events_bytes.json
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import zmq

from kvbaton.models.gguf import cached_hf_dir_for_gguf, find_bundled_smollm2_gguf, kvbaton_cache_dir
from vs_vllm_cpu import VLLM_VERSION, ensure_peer_env, free_port, serve_vllm

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a screw press adapted from wine making. "
    "Within fifty years presses operated in more than two hundred European cities, and the cost "
    "of a book fell so far that reading spread from monasteries and courts to merchants and "
    "artisans. Pamphlets carried the arguments of the Reformation across borders faster than any "
    "authority could answer them.",
    "A suspension bridge hangs its deck from vertical hangers attached to main cables that pass "
    "over tall towers and are anchored in massive blocks at each end. The cables carry the load "
    "in tension, the towers in compression, and the deck must be stiff enough to resist the "
    "twisting that wind can excite, a lesson engineers learned from the collapse of the Tacoma "
    "Narrows bridge in 1940.",
]


def _vllm_lines(text: str) -> str:
    """The exposition's vLLM and process families (Python's own GC and platform ones dropped)."""
    keep = ("vllm:", "process_")
    keep += tuple(f"# {kind} {prefix}" for kind in ("HELP", "TYPE") for prefix in keep)
    return "".join(line + "\n" for line in text.splitlines() if line.startswith(keep))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hashes", choices=["int", "bytes"], default="int",
                    help="VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (vLLM's default) or 0")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=48, help="KV blocks (small, so eviction happens)")
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "vllm-cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cli = ensure_peer_env(args.peer_env)
    model_dir = cached_hf_dir_for_gguf(find_bundled_smollm2_gguf())
    pub_port, replay_port = free_port(), free_port()
    events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub_port}",
                  "replay_endpoint": f"tcp://*:{replay_port}", "topic": "kv-events"}
    extra = ["--block-size", str(args.block_size), "--num-gpu-blocks-override", str(args.num_blocks),
             "--max-model-len", "1024", "--enable-prompt-tokens-details",
             "--kv-events-config", json.dumps(events_cfg)]
    env = {"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "1" if args.hashes == "int" else "0",
           "VLLM_SERVER_DEV_MODE": "1"}
    live: list[dict[str, Any]] = []
    stop = threading.Event()

    def subscribe() -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"tcp://127.0.0.1:{pub_port}")
        while not stop.is_set():
            if sock.poll(100):
                topic, seq, payload = sock.recv_multipart()
                live.append({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"),
                             "payload_b64": base64.b64encode(payload).decode()})
        sock.close(linger=0)

    record: dict[str, Any] = {"vllm": f"vllm-cpu {VLLM_VERSION}", "hashes": args.hashes,
                              "block_size": args.block_size, "command": " ".join(map(shlex.quote, sys.argv)),
                              "requests": []}
    with serve_vllm(cli, model_dir, "float32", extra_args=extra, env_extra=env) as url:
        thread = threading.Thread(target=subscribe, daemon=True)
        thread.start()
        time.sleep(1.0)  # the SUB socket joins before the first event
        client = httpx.Client(base_url=url, timeout=120)
        record["models"] = client.get("/v1/models").json()
        record["metrics_before"] = _vllm_lines(client.get("/metrics").text)
        tok = client.post("/tokenize", json={"model": str(model_dir), "prompt": TEXTS[0]}).json()
        record["tokenize"] = {"prompt": TEXTS[0], "answer": tok}
        ids = [client.post("/tokenize", json={"model": str(model_dir), "prompt": t}).json()["tokens"] for t in TEXTS]

        def complete(prompt: list[int], **extra_fields: Any) -> None:
            body = {"model": str(model_dir), "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra_fields}
            r = client.post("/v1/completions", json=body).json()
            record["requests"].append({"prompt": prompt, "fields": extra_fields, "usage": r.get("usage")})

        complete(ids[0])  # its full blocks are stored
        complete(ids[0] + ids[1][:40])  # the same prefix: cached, then new blocks
        complete(ids[0], cache_salt="tenant-a")  # salted: another chain
        with client.stream("POST", "/v1/completions", json={
                "model": str(model_dir), "prompt": ids[1], "max_tokens": 4, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}) as r:
            record["stream"] = [line for line in r.iter_lines() if line]
        record["requests"].append({"prompt": ids[1], "fields": {"stream": True}, "usage": None})
        # Distinct long prompts overflow the small cache: evictions.
        for k in range(8):
            complete([(ids[1][i % len(ids[1])] + 7 * k + 1) % 49000 for i in range(300)])
        time.sleep(0.5)
        record["metrics_after"] = _vllm_lines(client.get("/metrics").text)
        reset = client.post("/reset_prefix_cache")
        record["reset_status"] = reset.status_code
        complete(ids[0])  # the reset's AllBlocksCleared goes out with the next step's events
        time.sleep(1.0)
        # Replay from seq 0, as a subscriber that joined late asks for it.
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart((b"", (0).to_bytes(8, "big")))
        replay: list[dict[str, Any]] = []
        while dealer.poll(2000):
            # Kept frame by frame: vLLM 0.32 answers [b"", topic, seq, payload], older
            # publishers (and kvbaton's) [b"", seq, payload].
            frames = dealer.recv_multipart()
            replay.append({"frames_b64": [base64.b64encode(f).decode() for f in frames]})
            if frames[-2] == (-1).to_bytes(8, "big", signed=True):
                break
        dealer.close(linger=0)
        stop.set()
        thread.join(2)
    record["live"] = live
    record["replay"] = replay
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(live)} live batches, {len(replay)} replayed frames -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
