"""Block hashes: chained, salted per tenant, deterministic across processes."""

from __future__ import annotations

import subprocess
import sys

from kvbaton.kv.hashing import block_hash, hash_block_chain, root_hash

SCRIPT = (
    "from kvbaton.kv.hashing import hash_block_chain, root_hash;"
    "print(','.join(h.hex() for h in hash_block_chain(root_hash('m', 's'), list(range(40)), 16)))"
)


def test_chain_depends_on_every_earlier_token():
    root = root_hash("model-a")
    a = hash_block_chain(root, list(range(48)), 16)
    b = hash_block_chain(root, [999] + list(range(1, 48)), 16)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))
    assert a[1] == block_hash(a[0], list(range(16, 32)))


def test_incremental_extension_matches_full_chain():
    root = root_hash("m")
    toks = list(range(80))
    full = hash_block_chain(root, toks, 16)
    head = hash_block_chain(root, toks[:40], 16)
    assert head + hash_block_chain(root, toks, 16, head[-1], len(head)) == full


def test_salt_and_model_separate_roots():
    roots = {root_hash("m"), root_hash("m", "tenant-a"), root_hash("m", "tenant-b"),
             root_hash("m2"), root_hash("m", "")}
    assert len(roots) == 5


def _outputs_of_concurrent_runs(argvs: list[list[str]], envs: list[dict[str, str] | None]) -> set[str]:
    """The stdouts of the commands, started all at once (each is a fresh interpreter: running
    them side by side instead of one after another changes nothing they compute)."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for argv, env in zip(argvs, envs)]
    outs = set()
    for argv, p in zip(argvs, procs):
        out, err = p.communicate(timeout=120)
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, argv, out, err)
        outs.add(out)
    return outs


def test_deterministic_across_processes():
    runs = _outputs_of_concurrent_runs([[sys.executable, "-c", SCRIPT]] * 2,
                                       [{"PYTHONHASHSEED": str(seed), "PATH": ""} for seed in (1, 2)])
    local = ",".join(h.hex() for h in hash_block_chain(root_hash("m", "s"), list(range(40)), 16))
    assert runs == {local + "\n"}


def test_engine_root_is_deterministic_across_processes():
    code = (
        "from kvbaton import LLM;"
        "e = LLM('tiny-random', num_kv_blocks=8).engine;"
        "print(e.root_hash().hex(), e.root_hash('t').hex())"
    )
    outs = _outputs_of_concurrent_runs([[sys.executable, "-c", code]] * 2, [None, None])
    assert len(outs) == 1
    plain, salted = outs.pop().split()
    assert plain != salted


def test_the_hash_format_is_stable():
    """Hashes outlive a process (the disk tier's files, a router and workers of other
    versions): the chain's bytes must never change by accident. Values from the v1 format
    (sha256 over parent || little-endian u32 tokens || extra keys, cut to 16 bytes)."""
    root = root_hash("m", "s")
    assert hash_block_chain(root, list(range(40)), 16)[1].hex() == "d3e14dc379c793714de8fff776dcec8e"
    assert block_hash(root, [7, 70000, 3], b"lora").hex() == "ed0ab36af30dc3dc37454b1be003b538"
