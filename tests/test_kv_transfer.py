"""KV transfer data plane over TCP: byte-exact block moves, handshake checks, and every failure mode."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import pytest
import torch

from conftest import run_in_threads, wait_until
from kvbaton.kv.codec import block_checksums
from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import (
    AuthError,
    ChecksumError,
    Faults,
    LeaseError,
    PeerClosed,
    SpecMismatch,
    TransferClient,
    TransferError,
    TransferServer,
    TransferTimeout,
    wire,
)
from kvbaton.kv.transfer.blocks import contiguous_runs

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)
FP = "model-fp"


class Leases:
    """A minimal thread-safe lease table: lease id -> block ids."""

    def __init__(self) -> None:
        self.leases: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def add(self, lease_id: str, block_ids: list[int]) -> str:
        with self.lock:
            self.leases[lease_id] = list(block_ids)
        return lease_id

    def resolve(self, lease_id: str, block_indexes: list[int]) -> list[int]:
        with self.lock:
            blocks = self.leases.get(lease_id)
            if blocks is None:
                raise LeaseError(f"lease {lease_id!r} is unknown or expired")
            bad = [i for i in block_indexes if not 0 <= i < len(blocks)]
            if bad:
                raise LeaseError(f"lease {lease_id!r} has {len(blocks)} blocks; index {bad[0]} is outside it")
            return [blocks[i] for i in block_indexes]

    def release(self, lease_id: str) -> bool:
        with self.lock:
            return self.leases.pop(lease_id, None) is not None


def random_kv(spec: KVSpec, num_blocks: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, *spec.block_shape()), generator=g).to(spec.torch_dtype).to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@contextmanager
def serving(kv: torch.Tensor, spec: KVSpec = SPEC, **kwargs) -> Iterator[tuple[TransferServer, Leases]]:
    leases = Leases()
    server = TransferServer(kv, spec, kwargs.pop("fingerprint", FP), leases, **kwargs).start()
    try:
        yield server, leases
    finally:
        server.stop()


@contextmanager
def client(spec: KVSpec = SPEC, **kwargs) -> Iterator[TransferClient]:
    c = TransferClient(spec, kwargs.pop("fingerprint", FP), **kwargs)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_into_scattered_destination_blocks(dtype):
    spec = KVSpec(3, 2, 8, dtype, 4)
    src = random_kv(spec, 40, seed=1)
    src_ids = [5, 6, 7, 30, 2, 11, 12, 13, 14, 39]  # runs and singletons, out of order
    dst_ids = [9, 1, 2, 3, 17, 0, 4, 5, 6, 12]
    with serving(src, spec) as (server, leases), client(spec) as c:
        lease = leases.add("L1", src_ids)
        dst = spec.allocate(20, "cpu")
        stats = c.fetch(*server.address, lease, list(range(len(src_ids))), dst, dst_ids)
    assert (stats.blocks, stats.bytes) == (10, 10 * spec.bytes_per_block)
    for s, d in zip(src_ids, dst_ids):
        assert same_bytes(dst[d], src[s])
    untouched = sorted(set(range(20)) - set(dst_ids))
    assert not dst[untouched].any()


def test_many_blocks_in_one_message_and_index_subsets():
    src = random_kv(SPEC, 300, seed=2)
    with serving(src) as (server, leases), client() as c:
        lease = leases.add("big", list(range(299, -1, -1)))
        dst = SPEC.allocate(300, "cpu")
        c.fetch(*server.address, lease, list(range(300)), dst, list(range(300)))
        assert same_bytes(dst, src.flip(0))
        dst2 = SPEC.allocate(4, "cpu")
        c.fetch(*server.address, lease, [0, 299, 7, 7], dst2, [3, 2, 1, 0])  # an index twice is fine
        assert same_bytes(dst2, src[[292, 292, 0, 299]])  # lease index i is block 299 - i
        # The server counts a fetch after its last byte left, which can be after the client
        # has it all.
        wait_until(lambda: server.stats.fetches == 2 and server.stats.blocks_sent == 304)
        assert server.stats.connections == 1  # the second fetch reused the connection


def test_concurrent_clients():
    src = random_kv(SPEC, 64, seed=3)
    with serving(src) as (server, leases), client() as shared:

        def worker(k: int) -> None:
            ids = list(range(k * 8, k * 8 + 8))
            lease = leases.add(f"lease-{k}", ids)
            dst = SPEC.allocate(16, "cpu")
            with client() as own:
                for c in (own, shared, own, shared):
                    dst.zero_()
                    c.fetch(*server.address, lease, list(range(8)), dst, list(range(15, 7, -1)))
                    assert same_bytes(dst[8:].flip(0), src[ids])

        errors = run_in_threads(worker, 8)
    assert not errors, errors
    wait_until(lambda: server.stats.fetches == 32)


def test_corrupted_block_raises_checksum_error_naming_it():
    src = random_kv(SPEC, 16, seed=4)
    before = src.clone()
    with serving(src) as (server, leases), client() as c:
        lease = leases.add("L", list(range(16)))
        dst = SPEC.allocate(16, "cpu")
        server.faults = Faults(corrupt_block_index=5)
        with pytest.raises(ChecksumError, match="block 5 of the fetch .*lease index 5.*destination block 10") as ei:
            c.fetch(*server.address, lease, list(range(16)), dst, list(range(5, 16)) + list(range(5)))
        assert (ei.value.position, ei.value.block_index, ei.value.dst_block_id) == (5, 5, 10)
        assert same_bytes(src, before)  # corrupted on the wire only
        server.faults = None
        c.fetch(*server.address, lease, list(range(16)), dst, list(range(16)))
        assert same_bytes(dst, src)


def test_precomputed_checksums_are_what_the_server_sends():
    src = random_kv(SPEC, 8, seed=5)
    with serving(src) as (server, leases), client() as c:
        dst = SPEC.allocate(8, "cpu")
        good = leases.add("good", [1, 2, 3])
        server.put_checksums(good, [1, 2, 3], block_checksums(src, [1, 2, 3]))
        c.fetch(*server.address, good, [0, 1, 2], dst, [0, 1, 2])
        bad = leases.add("bad", [1, 2, 3])
        server.put_checksums(bad, [1, 2, 3], [0, 0, 0])
        with pytest.raises(ChecksumError, match="block 0 of the fetch"):
            c.fetch(*server.address, bad, [0, 1, 2], dst, [0, 1, 2])
    assert same_bytes(dst[:3], src[1:4])


@pytest.mark.parametrize(
    ("client_spec", "client_fp", "expected"),
    [
        (KVSpec(3, 2, 16, "float32", 4), FP, r"num_layers \(client 3, server 2\)"),
        (KVSpec(2, 2, 16, "bfloat16", 4), FP, r"dtype \(client 'bfloat16', server 'float32'\)"),
        (SPEC, "other-model", r"model fingerprint mismatch \(client 'other-model', server 'model-fp'\)"),
    ],
)
def test_spec_or_fingerprint_mismatch_is_refused_at_handshake(client_spec, client_fp, expected):
    with serving(random_kv(SPEC, 4)) as (server, leases), client(client_spec, fingerprint=client_fp) as c:
        lease = leases.add("L", [0, 1])
        dst = client_spec.allocate(2, "cpu")
        with pytest.raises(SpecMismatch, match=expected):
            c.fetch(*server.address, lease, [0, 1], dst, [0, 1])
        assert not dst.any()  # nothing was written
        wait_until(lambda: server.stats.spec_mismatches == 1)
        assert server.stats.fetches == 0


@pytest.mark.parametrize(
    ("server_secret", "client_secret", "expected"),
    [
        (b"s3cret", b"wrong", "proof is wrong"),
        (b"s3cret", None, "requires a shared secret; the client has none"),
        (None, b"s3cret", "expects a shared secret; this server has none"),
    ],
)
def test_wrong_or_missing_secret_is_refused_on_both_sides(server_secret, client_secret, expected):
    with serving(random_kv(SPEC, 4), secret=server_secret) as (server, leases), client(secret=client_secret) as c:
        lease = leases.add("L", [0])
        dst = SPEC.allocate(1, "cpu")
        with pytest.raises(AuthError, match=expected):
            c.fetch(*server.address, lease, [0], dst, [0])
        assert not dst.any()
        wait_until(lambda: server.stats.auth_failures == 1)
        assert server.stats.fetches == 0 and "AuthError" in server.stats.errors[-1]


def test_matching_secret_authenticates():
    src = random_kv(SPEC, 4, seed=6)
    with serving(src, secret=b"k") as (server, leases), client(secret=b"k") as c:
        lease = leases.add("L", [3])
        dst = SPEC.allocate(1, "cpu")
        c.fetch(*server.address, lease, [0], dst, [0])
    assert same_bytes(dst[0], src[3]) and server.stats.auth_failures == 0


def test_unknown_expired_or_out_of_range_lease_raises_lease_error():
    with serving(random_kv(SPEC, 8)) as (server, leases), client() as c:
        dst = SPEC.allocate(2, "cpu")
        with pytest.raises(LeaseError, match="'nope' is unknown or expired"):
            c.fetch(*server.address, "nope", [0], dst, [0])
        lease = leases.add("L", [1, 2])
        with pytest.raises(LeaseError, match="index 2 is outside it"):
            c.fetch(*server.address, lease, [0, 2], dst, [0, 1])
        leases.leases.pop(lease)  # the lease expires on the server
        with pytest.raises(LeaseError, match="unknown or expired"):
            c.fetch(*server.address, lease, [0], dst, [0])
        assert server.stats.lease_errors == 3
        assert server.stats.connections == 1  # a refused request keeps the connection usable


def test_release_is_idempotent():
    with serving(random_kv(SPEC, 8)) as (server, leases), client() as c:
        lease = leases.add("L", [1, 2])
        assert c.release(*server.address, lease) is True
        assert c.release(*server.address, lease) is False
        with pytest.raises(LeaseError):
            c.fetch(*server.address, lease, [0], SPEC.allocate(1, "cpu"), [0])


def test_stalled_server_raises_timeout():
    with serving(random_kv(SPEC, 8)) as (server, leases), client(timeout_s=0.5) as c:
        lease = leases.add("L", list(range(8)))
        server.faults = Faults(stall_after_bytes=SPEC.bytes_per_block + 100)
        with pytest.raises(TransferTimeout, match="within 0.5s"):
            c.fetch(*server.address, lease, list(range(8)), SPEC.allocate(8, "cpu"), list(range(8)))


def test_server_closing_mid_payload_raises_peer_closed():
    with serving(random_kv(SPEC, 8)) as (server, leases), client() as c:
        lease = leases.add("L", list(range(8)))
        server.faults = Faults(close_after_bytes=3 * SPEC.bytes_per_block + 7)
        with pytest.raises(PeerClosed):
            c.fetch(*server.address, lease, list(range(8)), SPEC.allocate(8, "cpu"), list(range(8)))
        server.faults = None  # the client drops the broken connection and opens a new one
        c.fetch(*server.address, lease, [0], SPEC.allocate(1, "cpu"), [0])


def test_server_stop_with_clients_connected_does_not_hang():
    with client(timeout_s=5) as idle_client, client(timeout_s=5) as stalled_client:
        server = TransferServer(random_kv(SPEC, 8), SPEC, FP, Leases()).start()
        server.source.add("L", list(range(8)))
        idle_client.fetch(*server.address, "L", [0], SPEC.allocate(1, "cpu"), [0])  # leaves a pooled connection
        server.faults = Faults(stall_after_bytes=10)
        failure: list[BaseException] = []

        def stalled() -> None:
            try:
                stalled_client.fetch(*server.address, "L", [0, 1], SPEC.allocate(2, "cpu"), [0, 1])
            except TransferError as exc:
                failure.append(exc)

        t = threading.Thread(target=stalled)
        t.start()
        wait_until(lambda: server.stats.connections == 2)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(10)
        t.join(10)
        assert not stopper.is_alive() and not t.is_alive()
        assert len(failure) == 1 and isinstance(failure[0], PeerClosed)


def test_stale_pooled_connection_is_replaced_transparently():
    src = random_kv(SPEC, 4, seed=7)
    with serving(src, idle_timeout_s=0.1) as (server, leases), client() as c:
        lease = leases.add("L", [0, 1])
        dst = SPEC.allocate(2, "cpu")
        c.fetch(*server.address, lease, [0], dst, [0])
        time.sleep(0.3)  # the server drops the idle connection
        c.fetch(*server.address, lease, [1], dst, [1])
        assert same_bytes(dst, src[:2]) and server.stats.connections == 2


def test_unreachable_server_and_bad_arguments():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with client() as c:
            with pytest.raises(TransferError, match="cannot connect"):
                c.fetch("127.0.0.1", port, "L", [0], SPEC.allocate(1, "cpu"), [0])
            with pytest.raises(ValueError, match="duplicates"):
                c.fetch("127.0.0.1", port, "L", [0, 1], SPEC.allocate(2, "cpu"), [1, 1])
            with pytest.raises(ValueError, match="2 entries"):
                c.fetch("127.0.0.1", port, "L", [0, 1], SPEC.allocate(2, "cpu"), [1])
            with pytest.raises(ValueError, match="outside dst"):
                c.fetch("127.0.0.1", port, "L", [0], SPEC.allocate(2, "cpu"), [2])
            with pytest.raises(ValueError, match="dst has shape"):
                c.fetch("127.0.0.1", port, "L", [0], torch.zeros(2, 3), [0])


def test_wire_is_msgpack_only_and_pickle_is_refused():
    msgs = [
        wire.Hello(1, wire.SpecMsg.of(SPEC), FP, "crc32", b"n" * 32, False),
        wire.Welcome(b"n", b"p"),
        wire.Proof(b"p"),
        wire.Ready(),
        wire.FetchRequest("L", [1, 2]),
        wire.BlocksHeader(64, [1, 2]),
        wire.ReleaseRequest("L"),
        wire.ReleaseReply(True),
        wire.Error("lease", "x"),
    ]
    for m in msgs:
        frame = wire.encode_frame(m)
        body = frame[wire.FRAME_PREFIX.size :]
        assert wire.FRAME_PREFIX.unpack(frame[: wire.FRAME_PREFIX.size])[0] == len(body)
        assert isinstance(msgspec.msgpack.decode(body), dict)  # plain msgpack, readable by anyone
        assert wire.decode(body) == m
    import pickle

    with serving(random_kv(SPEC, 2)) as (server, _):
        with socket.create_connection(server.address, timeout=5) as s:
            body = pickle.dumps({"type": "hello"})
            s.sendall(wire.FRAME_PREFIX.pack(len(body)) + body)
            assert s.recv(1) == b""  # the server hangs up
        wait_until(lambda: bool(server.stats.errors))
        assert "malformed message" in server.stats.errors[-1]


def test_contiguous_runs():
    assert contiguous_runs([]) == []
    assert contiguous_runs([4, 5, 6, 1, 9, 10, 3]) == [(0, 3), (3, 1), (4, 2), (6, 1)]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("src_dev", "dst_dev"), [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
def test_cuda_round_trip_through_pinned_staging(src_dev, dst_dev):
    spec = KVSpec(2, 2, 16, "bfloat16", 4)
    src = random_kv(spec, 32, seed=8, device=src_dev)
    src_ids = list(range(20, 32)) + [3, 1]
    dst_ids = [0, 5, 6, 7, 8, 30, 2, 9, 10, 11, 12, 13, 14, 29]
    staging = 3 * spec.bytes_per_block  # several chunks per fetch
    with serving(src, spec, staging_bytes=staging) as (server, leases), client(spec, staging_bytes=staging) as c:
        lease = leases.add("L", src_ids)
        dst = spec.allocate(32, dst_dev)
        c.fetch(*server.address, lease, list(range(len(src_ids))), dst, dst_ids)
        server.faults = Faults(corrupt_block_index=7)
        with pytest.raises(ChecksumError, match="block 7 of the fetch"):
            c.fetch(*server.address, lease, list(range(len(src_ids))), spec.allocate(32, dst_dev), dst_ids)
    for s, d in zip(src_ids, dst_ids):
        assert same_bytes(dst[d], src[s])
