"""Same-host shared-memory path of the KV transfer data plane: byte-exact copies, checksum and
lease errors, TCP fallback, pins released whatever the client does, and the shared file's life."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from conftest import run_in_threads, wait_until
from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import (
    AuthError,
    ChecksumError,
    LeaseError,
    ProtocolError,
    SharedKV,
    TransferServer,
    allocate_shared_kv,
    shm,
    sockio,
    wire,
)
from kvbaton.kv.transfer.handshake import client_handshake
from kvbaton.kv.transfer.shm_read import ShmMapping
from test_kv_transfer import FP, SPEC, Leases, client, same_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PinningLeases(Leases):
    """Counts pins the way the worker's lease table does: resolve pins, ``end`` unpins."""

    def __init__(self) -> None:
        super().__init__()
        self.pins = 0

    def resolve(self, lease_id: str, block_indexes: list[int]) -> list[int]:
        ids = super().resolve(lease_id, block_indexes)
        with self.lock:
            self.pins += 1
        return ids

    def end(self, lease_id: str) -> None:
        with self.lock:
            self.pins -= 1


@contextmanager
def shared_kv(spec: KVSpec, num_blocks: int, seed: int = 0) -> Iterator[SharedKV]:
    kv = SharedKV.create(spec, num_blocks)
    g = torch.Generator().manual_seed(seed)
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=g).to(spec.torch_dtype))
    try:
        yield kv
    finally:
        kv.close()


@contextmanager
def serving_shared(
    kv: torch.Tensor, spec: KVSpec = SPEC, **kwargs
) -> Iterator[tuple[TransferServer, PinningLeases]]:
    leases = PinningLeases()
    server = TransferServer(kv, spec, FP, leases, **kwargs).start()
    try:
        yield server, leases
    finally:
        server.stop()


@contextmanager
def raw_peer(
    server: TransferServer, secret: bytes | None = None
) -> Iterator[tuple[socket.socket, wire.ShmOffer | None]]:
    """A hand-driven client connection that asked for shared memory."""
    deadline = sockio.Deadline(5, "test")
    sock = sockio.connect(*server.address, deadline, None)
    try:
        yield sock, client_handshake(sock, wire.SpecMsg.of(SPEC), FP, secret, deadline, shm.host_id())
    finally:
        sock.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_into_scattered_destination_blocks(dtype):
    spec = KVSpec(3, 2, 8, dtype, 4)
    src_ids = [5, 6, 7, 30, 2, 11, 12, 13, 14, 39]
    dst_ids = [9, 1, 2, 3, 17, 0, 4, 5, 6, 12]
    with shared_kv(spec, 40, seed=1) as kv, serving_shared(kv.tensor, spec) as (server, leases), client(spec) as c:
        lease = leases.add("L1", src_ids)
        dst = spec.allocate(20, "cpu")
        stats = c.fetch(*server.address, lease, list(range(len(src_ids))), dst, dst_ids)
        assert (stats.path, stats.blocks, stats.bytes) == ("shm", 10, 10 * spec.bytes_per_block)
        for s, d in zip(src_ids, dst_ids):
            assert same_bytes(dst[d], kv.tensor[s])
        assert not dst[sorted(set(range(20)) - set(dst_ids))].any()
        wait_until(lambda: server.stats.shm_fetches == 1 and leases.pins == 0)
        assert server.stats.bytes_sent == 10 * spec.bytes_per_block


def test_pin_is_held_during_the_copy_and_released_on_done(monkeypatch):
    seen: list[int] = []
    original = ShmMapping.copy_verified

    def spying(self, *args, **kwargs):
        seen.append(leases.pins)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShmMapping, "copy_verified", spying)
    with shared_kv(SPEC, 8) as kv, serving_shared(kv.tensor) as (server, leases), client() as c:
        lease = leases.add("L", [1, 2, 3])
        for _ in range(3):  # one connection, one mapping, three fetches
            c.fetch(*server.address, lease, [0, 1, 2], SPEC.allocate(3, "cpu"), [0, 1, 2])
        assert seen == [1, 1, 1]
        wait_until(lambda: leases.pins == 0 and server.stats.shm_fetches == 3)
        assert server.stats.connections == 1 and c.num_mapped == 1


def test_source_rewritten_after_checksums_were_cached_raises_checksum_error():
    with shared_kv(SPEC, 16, seed=4) as kv, serving_shared(kv.tensor) as (server, leases), client() as c:
        lease = leases.add("L", list(range(16)))
        dst = SPEC.allocate(16, "cpu")
        c.fetch(*server.address, lease, list(range(16)), dst, list(range(16)))  # caches the checksums
        good = kv.tensor[5].clone()
        kv.tensor[5].view(-1)[7] += 1  # corrupt the shared bytes behind the server's back
        dst_ids = list(range(5, 16)) + list(range(5))
        expected = r"block 5 of the fetch .*lease index 5.*destination block 10.*xxh3_64"
        with pytest.raises(ChecksumError, match=expected) as ei:
            c.fetch(*server.address, lease, list(range(16)), dst, dst_ids)
        assert (ei.value.position, ei.value.block_index, ei.value.dst_block_id) == (5, 5, 10)
        wait_until(lambda: leases.pins == 0)  # the client said done despite the failure
        kv.tensor[5].copy_(good)
        assert c.fetch(*server.address, lease, list(range(16)), dst, list(range(16))).path == "shm"
        assert same_bytes(dst, kv.tensor) and server.stats.connections == 1


def test_lease_errors_over_shm_keep_the_connection():
    with shared_kv(SPEC, 8) as kv, serving_shared(kv.tensor) as (server, leases), client() as c:
        dst = SPEC.allocate(2, "cpu")
        with pytest.raises(LeaseError, match="'nope' is unknown or expired"):
            c.fetch(*server.address, "nope", [0], dst, [0])
        lease = leases.add("L", [1, 2])
        with pytest.raises(LeaseError, match="index 2 is outside it"):
            c.fetch(*server.address, lease, [0, 2], dst, [0, 1])
        assert c.fetch(*server.address, lease, [1, 0], dst, [0, 1]).path == "shm"
        assert same_bytes(dst, kv.tensor[[2, 1]])
        assert server.stats.lease_errors == 2 and server.stats.connections == 1
        wait_until(lambda: leases.pins == 0)


@pytest.mark.parametrize("how", ["client_prefers_tcp", "server_prefers_tcp", "file_unlinked", "private_kv"])
def test_falls_back_to_tcp_bytes(how):
    with shared_kv(SPEC, 8, seed=2) as kv:
        src = kv.tensor if how != "private_kv" else kv.tensor.clone()
        with serving_shared(src, prefer_shm=how != "server_prefers_tcp") as (server, leases):
            with client(prefer_shm=how != "client_prefers_tcp") as c:
                if how == "file_unlinked":
                    os.unlink(kv.path)  # as if another /dev/shm: the offer is made but cannot be opened
                lease = leases.add("L", [7, 0])
                dst = SPEC.allocate(2, "cpu")
                stats = c.fetch(*server.address, lease, [0, 1], dst, [0, 1])
                assert stats.path == "tcp" and server.stats.shm_fetches == 0
                assert same_bytes(dst, src[[7, 0]])


def test_closed_shared_kv_is_no_longer_offered_but_stays_usable():
    with shared_kv(SPEC, 4, seed=3) as kv, serving_shared(kv.tensor) as (server, leases), client() as c:
        assert server.shm_offer is not None
        kv.close()
        assert not os.path.exists(kv.path) and server.shm_offer is None
        kv.tensor[0].fill_(1.0)  # the memory itself is still ours
        lease = leases.add("L", [0])
        dst = SPEC.allocate(1, "cpu")
        assert c.fetch(*server.address, lease, [0], dst, [0]).path == "tcp"
        assert same_bytes(dst[0], kv.tensor[0])


def test_pin_released_when_the_client_hangs_up_or_goes_silent():
    with shared_kv(SPEC, 4) as kv, serving_shared(kv.tensor, io_timeout_s=0.5) as (server, leases):
        lease = leases.add("L", [2, 3])
        for hang_up in (True, False):
            with raw_peer(server) as (sock, offer):
                assert offer == server.shm_offer
                deadline = sockio.Deadline(5, "test")
                sockio.send_msg(sock, wire.FetchRequest(lease, [0, 1], shm=True), deadline)
                reply = sockio.recv_msg(sock, deadline)
                assert isinstance(reply, wire.ShmBlocks) and reply.block_ids == [2, 3]
                assert leases.pins == 1
                if hang_up:
                    sock.shutdown(socket.SHUT_RDWR)
                else:  # says nothing: the server gives up after io_timeout_s and hangs up
                    sock.settimeout(5)
                    assert sock.recv(1) == b""
                wait_until(lambda: leases.pins == 0)
        assert server.stats.shm_fetches == 0


def test_shm_fetch_refused_without_an_offer_and_offer_needs_auth_and_same_host():
    with shared_kv(SPEC, 4) as kv, serving_shared(kv.tensor, prefer_shm=False) as (server, leases):
        leases.add("L", [0])
        with raw_peer(server) as (sock, offer):
            assert offer is None
            deadline = sockio.Deadline(5, "test")
            sockio.send_msg(sock, wire.FetchRequest("L", [0], shm=True), deadline)
            reply = sockio.recv_msg(sock, deadline)
            assert isinstance(reply, wire.Error) and "shared memory was not offered" in reply.message
        assert leases.pins == 0
    with shared_kv(SPEC, 4) as kv, serving_shared(kv.tensor, secret=b"k") as (server, _):
        with pytest.raises(AuthError):
            with raw_peer(server, secret=b"wrong"):
                pass
        with raw_peer(server, secret=b"k") as (_, offer):
            assert offer is not None and offer.path == kv.path
        deadline = sockio.Deadline(5, "test")
        with socket.create_connection(server.address, timeout=5) as sock:
            sockio.configure(sock)  # another host: no offer
            assert client_handshake(sock, wire.SpecMsg.of(SPEC), FP, b"k", deadline, "elsewhere/host") is None


def test_mapping_refuses_offers_it_cannot_trust():
    with shared_kv(SPEC, 4) as kv, serving_shared(kv.tensor) as (server, _):
        offer = server.shm_offer
        assert offer is not None
        cases = {
            "offered by host": {"host_id": "other/host"},
            "not a kvbaton KV file": {"path": "/etc/passwd"},
            "blocks of": {"block_bytes": offer.block_bytes * 2},
            "do not fit": {"num_blocks": offer.num_blocks + 1},
            "not the offered file": {"ino": offer.ino + 1},
        }
        for message, change in cases.items():
            fields = {f: getattr(offer, f) for f in wire.ShmOffer.__struct_fields__} | change
            with pytest.raises(ValueError, match=message):
                ShmMapping.open(wire.ShmOffer(**fields), SPEC.bytes_per_block)


def test_server_naming_blocks_outside_the_mapping_is_a_protocol_error():
    with shared_kv(SPEC, 4) as kv, serving_shared(kv.tensor) as (server, _):
        mapping = ShmMapping.open(server.shm_offer, SPEC.bytes_per_block)
        from kvbaton.kv.transfer.blocks import BlockIO

        io = BlockIO(SPEC.allocate(1, "cpu"), SPEC)
        with pytest.raises(ProtocolError, match="outside its 4 shared blocks"):
            mapping.copy_verified([4], [0], io, [0], [0])
        with pytest.raises(ProtocolError, match="asked for 1"):
            mapping.copy_verified([0, 1], [0, 0], io, [0], [0])


def test_checksum_algorithm_mismatch_is_refused_clearly():
    with shared_kv(SPEC, 2) as kv, serving_shared(kv.tensor) as (server, _):
        with socket.create_connection(server.address, timeout=5) as sock:
            sockio.configure(sock)
            deadline = sockio.Deadline(5, "test")
            sockio.send_msg(sock, wire.Hello(1, wire.SpecMsg.of(SPEC), FP, "crc32", b"n" * 32, False), deadline)
            reply = sockio.recv_msg(sock, deadline)
        assert isinstance(reply, wire.Error) and reply.kind == "protocol"
        assert reply.message == "checksum 'crc32' is not supported (server uses 'xxh3_64')"


def test_shared_file_is_private_and_unlinked_on_close_or_when_the_tensor_goes():
    kv = SharedKV.create(SPEC, 3)
    assert os.stat(kv.path).st_mode & 0o777 == 0o600
    assert os.path.basename(kv.path).startswith(f"kvbaton-kv-{os.getpid()}-")
    assert not kv.tensor.any() and tuple(kv.tensor.shape) == (3, *SPEC.block_shape())
    kv.close()
    assert not os.path.exists(kv.path)
    tensor = allocate_shared_kv(SPEC, 2)
    path = shm.offer_for(tensor, SPEC.bytes_per_block).path
    view = tensor[1]
    del tensor
    gc.collect()
    assert os.path.exists(path)  # a view still maps it
    del view
    gc.collect()
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        SharedKV.create(SPEC, 0)


def test_allocate_shared_kv_falls_back_to_private_memory(monkeypatch, caplog):
    def no_room(*args, **kwargs):
        raise OSError(28, "cannot reserve 1.0 MiB for the KV cache in /dev/shm")

    monkeypatch.setattr(SharedKV, "create", no_room)
    kv = allocate_shared_kv(SPEC, 2)
    assert shm.offer_for(kv, SPEC.bytes_per_block) is None and not kv.any()
    assert "same-host transfers will use TCP" in caplog.text


_SERVER = textwrap.dedent(
    """
    import sys, torch
    from kvbaton.kv.spec import KVSpec
    from kvbaton.kv.transfer import SharedKV, TransferServer
    from test_kv_transfer import Leases
    spec = KVSpec(2, 2, 16, "bfloat16", 4)
    kv = SharedKV.create(spec, 12)
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(9)).to(spec.torch_dtype))
    leases = Leases()
    leases.add("L", [11, 3, 4, 5])
    with TransferServer(kv.tensor, spec, "model-fp", leases) as server:
        print(server.address[1], kv.path, flush=True)
        sys.stdin.read()
    """
)


@contextmanager
def server_process() -> Iterator[tuple[subprocess.Popen, int, str]]:
    paths = [os.path.join(REPO, "tests"), REPO, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        port, path = proc.stdout.readline().split()
        yield proc, int(port), path
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(30)


def test_two_processes_share_memory_and_the_file_goes_with_its_creator():
    spec = KVSpec(2, 2, 16, "bfloat16", 4)
    expected = torch.randn((12, *spec.block_shape()), generator=torch.Generator().manual_seed(9)).to(spec.torch_dtype)
    with server_process() as (proc, port, path), client(spec) as c:
        dst = spec.allocate(6, "cpu")
        stats = c.fetch("127.0.0.1", port, "L", [0, 1, 2, 3], dst, [5, 0, 1, 2])
        assert stats.path == "shm" and os.path.exists(path)
        assert same_bytes(dst[[5, 0, 1, 2]], expected[[11, 3, 4, 5]])
        proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0 and not os.path.exists(path)


def test_file_of_a_killed_creator_is_swept_by_the_next_one():
    with server_process() as (proc, _, path):
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert os.path.exists(path)  # the leak window: no code ran at its death
    with shared_kv(SPEC, 1) as kv:
        assert not os.path.exists(path) and os.path.exists(kv.path)  # ours is alive, so kept


def test_concurrent_shm_fetches():
    with shared_kv(SPEC, 64, seed=5) as kv, serving_shared(kv.tensor) as (server, leases), client() as shared_client:

        def worker(k: int) -> None:
            lease = leases.add(f"lease-{k}", list(range(k * 8, k * 8 + 8)))
            dst = SPEC.allocate(8, "cpu")
            for _ in range(3):
                assert shared_client.fetch(*server.address, lease, list(range(8)), dst, list(range(8))).path == "shm"
                assert same_bytes(dst, kv.tensor[k * 8 : k * 8 + 8])

        errors = run_in_threads(worker, 8)
        assert not errors, errors
        wait_until(lambda: server.stats.shm_fetches == 24 and leases.pins == 0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_destination_through_pinned_staging():
    spec = KVSpec(2, 2, 16, "bfloat16", 4)
    staging = 3 * spec.bytes_per_block  # several chunks per fetch
    with shared_kv(spec, 32, seed=8) as kv, serving_shared(kv.tensor, spec) as (server, leases):
        with client(spec, staging_bytes=staging) as c:
            src_ids = list(range(20, 32)) + [3, 1]
            dst_ids = [0, 5, 6, 7, 8, 30, 2, 9, 10, 11, 12, 13, 14, 29]
            lease = leases.add("L", src_ids)
            dst = spec.allocate(32, "cuda")
            assert c.fetch(*server.address, lease, list(range(len(src_ids))), dst, dst_ids).path == "shm"
            for s, d in zip(src_ids, dst_ids):
                assert same_bytes(dst[d], kv.tensor[s])


def test_injected_faults_apply_to_shm_fetches():
    from kvbaton.kv.transfer import Faults, PeerClosed, TransferTimeout

    with shared_kv(SPEC, 8, seed=6) as kv, serving_shared(kv.tensor) as (server, leases), client(timeout_s=0.5) as c:
        lease = leases.add("L", list(range(8)))
        dst = SPEC.allocate(8, "cpu")
        server.faults = Faults(corrupt_block_index=3)
        with pytest.raises(ChecksumError, match="block 3 of the fetch"):
            c.fetch(*server.address, lease, list(range(8)), dst, list(range(8)))
        server.faults = Faults(stall_after_bytes=0)
        with pytest.raises(TransferTimeout, match="within 0.5s"):
            c.fetch(*server.address, lease, list(range(8)), dst, list(range(8)))
        server.faults = Faults(close_after_bytes=0)
        with pytest.raises(PeerClosed):
            c.fetch(*server.address, lease, list(range(8)), dst, list(range(8)))
        server.faults = None
        assert c.fetch(*server.address, lease, list(range(8)), dst, list(range(8))).path == "shm"
        assert same_bytes(dst, kv.tensor)
        wait_until(lambda: leases.pins == 0)


def test_shm_messages_are_plain_msgpack():
    offer = wire.ShmOffer("boot/host", "/dev/shm/kvbaton-kv-1-ab", 4096, 1, 2, 0, 4, 1024)
    msgs = (wire.Ready(offer), wire.FetchRequest("L", [0], shm=True), wire.ShmBlocks([3], [2**64 - 1]), wire.ShmDone())
    for m in msgs:
        assert wire.decode(wire.encode_frame(m)[wire.FRAME_PREFIX.size :]) == m
