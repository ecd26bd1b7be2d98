"""The disk tier: files that round-trip, survive a restart in LRU order, never load corrupt
bytes, and a full or unwritable disk that turns the tier off with one warning."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvbaton.kv.events import BlockRemoved, BlockStored
from kvbaton.kv.hashing import BlockHash, hash_block_chain, root_hash
from kvbaton.kv.store.base import BlockMeta, StorePlan, TierError
from kvbaton.kv.store.disk import DISK_MEDIUM, DiskTier
from kvbaton.kv.store.policies import make_policy

FP = "test-model-fingerprint"
LAYOUT = "blockfirst:L2:H1:D4:float32:B4"
BLOCK_SIZE = 4
BLOCK_BYTES = 1000  # deliberately not a power of two
LOGGER = "kvbaton.kv.store.disk"

MakeTier = Callable[..., DiskTier]


@pytest.fixture
def make_tier() -> Iterator[MakeTier]:
    """Build DiskTiers (closed at teardown); keyword arguments override the defaults."""
    made: list[DiskTier] = []

    def make(root: Path, capacity: int = 8, fingerprint: str = FP, **kwargs: object) -> DiskTier:
        tier = DiskTier(root, capacity, BLOCK_BYTES, BLOCK_SIZE, LAYOUT, fingerprint, make_policy("lru"),
                        **kwargs)  # type: ignore[arg-type]
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


def chain(n: int, seed: int = 0, fingerprint: str = FP) -> tuple[list[BlockHash], list[BlockMeta]]:
    rng = random.Random(seed)
    tokens = [rng.randrange(50_000) for _ in range(n * BLOCK_SIZE)]
    hashes = hash_block_chain(root_hash(fingerprint), tokens, BLOCK_SIZE)
    metas = [BlockMeta(hashes[i - 1] if i else None, tuple(tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]))
             for i in range(n)]
    return hashes, metas


def random_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BLOCK_BYTES), dtype=torch.uint8, generator=g)


def store(tier: DiskTier, hashes: list[BlockHash], metas: list[BlockMeta], rows: torch.Tensor) -> StorePlan:
    """prepare_store -> write (row i holds hashes[i]) -> complete_store(ok)."""
    plan = tier.dir.prepare_store(hashes, metas)
    tier.write(plan, rows, [hashes.index(h) for h in plan.hashes])
    tier.dir.complete_store(plan, ok=True)
    return plan


def load(tier: DiskTier, hashes: list[BlockHash]) -> tuple[torch.Tensor, list[BlockHash]]:
    """prepare_load -> read into other, reversed rows of a zeroed buffer -> complete_load."""
    plan = tier.dir.prepare_load(hashes)
    dst = torch.zeros((len(hashes) + 3, BLOCK_BYTES), dtype=torch.uint8)
    ids = [len(hashes) + 2 - i for i in range(len(hashes))]
    bad = tier.read(plan, dst, ids)
    tier.dir.complete_load(plan, ok=True, bad=bad)
    return dst[ids], bad


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def stored_order(tier: DiskTier) -> list[BlockHash]:
    events = tier.dir.take_events()
    assert all(isinstance(e, BlockStored) and e.medium == DISK_MEDIUM for e in events)
    return [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]


def test_blocks_round_trip_with_events_and_the_documented_file_format(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(5)
    rows = random_rows(5)
    store(tier, hashes, metas, rows)

    events = tier.dir.take_events()
    assert [type(e) for e in events] == [BlockStored] * 5
    for e, h, meta in zip(events, hashes, metas):
        assert isinstance(e, BlockStored)
        assert (e.block_hashes, e.parent_block_hash, e.token_ids, e.medium) == (
            [h], meta.parent, list(meta.token_ids), DISK_MEDIUM)
    assert tier.dir.lookup(hashes) == 5

    got, bad = load(tier, hashes)
    assert bad == []
    assert torch.equal(got, rows)

    # The format the module docstring promises.
    model_dir = hashlib.sha256((FP + LAYOUT).encode()).hexdigest()[:16]
    assert tier.path == tmp_path / model_dir
    assert tier.payload_offset % 4096 == 0 and tier.file_bytes == tier.payload_offset + BLOCK_BYTES
    assert tier.nbytes == 8 * BLOCK_BYTES
    for i, h in enumerate(hashes):
        path = tmp_path / model_dir / h.hex()[:2] / f"{h.hex()}.kvb"
        assert tier.file_of(h) == str(path)
        data = path.read_bytes()
        assert len(data) == tier.file_bytes
        magic, version, _, offset = struct.unpack_from("<4sHHI", data)
        assert (magic, version, offset) == (b"KVBT", 1, tier.payload_offset)
        assert data[offset:] == rows[i].numpy().tobytes()
    assert tier.enabled and tier.disabled_reason is None
    tier.dir.check()


def test_a_restart_finds_the_blocks_in_mtime_lru_order(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(6)
    rows = random_rows(6)
    store(tier, hashes, metas, rows)
    tier.close()
    # Last-use order differs from write order and from name order: only mtimes say it.
    oldest_first = [3, 0, 5, 1, 4, 2]
    base_ns = (int(os.stat(tier.file_of(hashes[0])).st_mtime) - 1000) * 10**9
    for k, i in enumerate(oldest_first):
        os.utime(tier.file_of(hashes[i]), ns=(base_ns + k * 10**9, base_ns + k * 10**9))

    again = make_tier(tmp_path)
    assert (again.scan_found, again.scan_removed) == (6, 0)
    assert stored_order(again) == [hashes[i] for i in oldest_first]
    assert again.dir.lookup(hashes) == 6
    assert [again.dir.meta_of(h) for h in hashes] == metas
    again.dir.check()
    again.close()

    # A smaller capacity keeps the newest four: the two oldest files are deleted at the scan.
    small = make_tier(tmp_path, capacity=4)
    assert (small.scan_found, small.scan_removed) == (4, 2)
    kept = [hashes[i] for i in oldest_first[2:]]
    assert stored_order(small) == kept
    for i in oldest_first[:2]:
        assert not os.path.exists(small.file_of(hashes[i]))
    # ...and the next store evicts the least recently used of those that are left.
    new_hashes, new_metas = chain(1, seed=1)
    plan = store(small, new_hashes, new_metas, random_rows(1, seed=1))
    assert plan.evicted == [kept[0]]
    assert os.path.exists(small.file_of(kept[0]))  # until the IO thread's removed() runs
    small.removed(plan.evicted)
    assert not os.path.exists(small.file_of(kept[0]))

    got, bad = load(small, kept[1:])
    assert bad == []
    assert torch.equal(got, rows[[hashes.index(h) for h in kept[1:]]])
    small.dir.check()

    # A load refreshes the file's mtime, so the next restart sees it as the newest. The files
    # written or loaded just above carry the same "now" to the kernel's clock tick (a few ms on
    # some filesystems), so they are first aged to distinct past times: only the load can then
    # make kept[1] the newest.
    for k, h in enumerate(kept[1:] + new_hashes):
        os.utime(small.file_of(h), ns=(base_ns + k * 10**9, base_ns + k * 10**9))
    got, bad = load(small, [kept[1]])
    assert bad == []
    small.close()
    after = make_tier(tmp_path, capacity=4)
    assert stored_order(after)[-1] == kept[1]
    after.dir.check()


def test_the_scan_drops_foreign_truncated_and_leftover_files_and_a_read_drops_corrupt_ones(
        tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(4)
    rows = random_rows(4)
    store(tier, hashes, metas, rows)
    tier.close()
    good, corrupt, truncated, bad_magic = hashes

    with open(tier.file_of(corrupt), "r+b") as f:  # flip a payload byte: the header stays valid
        f.seek(tier.payload_offset + 17)
        byte = f.read(1)[0]
        f.seek(tier.payload_offset + 17)
        f.write(bytes([byte ^ 0x40]))
    os.truncate(tier.file_of(truncated), tier.file_bytes - 1)
    with open(tier.file_of(bad_magic), "r+b") as f:
        f.write(b"XXXX")

    # Another model's block on the same root lives in its own directory...
    other = make_tier(tmp_path, fingerprint="another-model")
    other_hashes, other_metas = chain(1, fingerprint="another-model")
    store(other, other_hashes, other_metas, random_rows(1, seed=2))
    other.close()
    assert other.path != tier.path
    # ...and copied into ours (under its own name) it is rejected for its fingerprint;
    foreign = tier.file_of(other_hashes[0])
    shutil.copy(other.file_of(other_hashes[0]), foreign)
    # a valid file of ours under another block's name is rejected for its hash;
    renamed_hash = bytes(range(16))
    shutil.copy(tier.file_of(good), tier.file_of(renamed_hash))
    # a crash's temp file is deleted; a file that is not ours is left alone.
    leftover = tier.path / "07" / ".tmp-999-deadbeef"
    leftover.write_bytes(b"half a block")
    not_ours = tier.path / "notes.txt"
    not_ours.write_text("keep me")

    again = make_tier(tmp_path)
    assert (again.scan_found, again.scan_removed) == (2, 5)
    for path in (tier.file_of(truncated), tier.file_of(bad_magic), foreign, tier.file_of(renamed_hash), leftover):
        assert not os.path.exists(path)
    assert not_ours.exists()
    assert sorted(stored_order(again)) == sorted([good, corrupt])

    # The corrupt payload passed the scan (its header is fine) but never loads.
    _, bad = load(again, [good, corrupt])
    assert bad == [corrupt]
    assert not os.path.exists(again.file_of(corrupt))
    assert corrupt not in again.dir and again.dir.lookup([corrupt]) == 0
    assert [e for e in again.dir.take_events() if isinstance(e, BlockRemoved)] == [
        BlockRemoved([corrupt], medium=DISK_MEDIUM)]
    got, bad = load(again, [good])
    assert bad == [] and torch.equal(got[0], rows[0])
    assert again.read_bad == 1
    again.dir.check()
    again.close()

    last = make_tier(tmp_path)
    assert (last.scan_found, last.scan_removed) == (1, 0)
    assert last.dir.lookup([good]) == 1 and corrupt not in last.dir
    last.dir.check()
    # The other model still sees only its own block.
    last_other = make_tier(tmp_path, fingerprint="another-model")
    assert last_other.scan_found == 1 and last_other.dir.lookup(other_hashes) == 1


def test_a_file_deleted_behind_our_back_reads_as_bad(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(3)
    rows = random_rows(3)
    store(tier, hashes, metas, rows)
    os.unlink(tier.file_of(hashes[1]))
    got, bad = load(tier, hashes)
    assert bad == [hashes[1]]
    assert torch.equal(got[0], rows[0]) and torch.equal(got[2], rows[2])
    assert hashes[1] not in tier.dir
    tier.dir.check()


def test_a_vanished_directory_fails_reads_as_a_whole_and_disables_writes(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = make_tier(tmp_path)
    hashes, metas = chain(3)
    store(tier, hashes[:2], metas[:2], random_rows(3))
    shutil.rmtree(tier.path)
    load_plan = tier.dir.prepare_load(hashes[:2])
    with pytest.raises(TierError, match="vanished"):
        tier.read(load_plan, random_rows(2), [0, 1])
    tier.dir.complete_load(load_plan, ok=False)
    assert tier.dir.lookup(hashes[:2]) == 2  # kept: a failed medium is not a corrupt block

    plan = tier.dir.prepare_store(hashes[2:], metas[2:])
    with pytest.raises(TierError):
        tier.write(plan, random_rows(1), [0])
    tier.dir.complete_store(plan, ok=False)
    assert not tier.enabled and len(warnings_of(caplog)) == 1
    tier.dir.check()


def test_a_removed_subdirectory_is_recreated_on_write(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(1)
    rows = random_rows(1)
    shutil.rmtree(Path(tier.file_of(hashes[0])).parent)
    store(tier, hashes, metas, rows)
    got, bad = load(tier, hashes)
    assert bad == [] and torch.equal(got, rows)
    assert tier.enabled
    tier.dir.check()


def test_storing_past_capacity_evicts_lru_and_removed_deletes_the_files(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path, capacity=3)
    hashes, metas = chain(5)
    rows = random_rows(5)
    evicted: list[BlockHash] = []
    for i in range(5):
        plan = store(tier, hashes[i : i + 1], metas[i : i + 1], rows[i : i + 1])
        evicted += plan.evicted
        tier.dir.check()
    assert evicted == hashes[:2]
    assert all(os.path.exists(tier.file_of(h)) for h in hashes)
    tier.removed(evicted + [bytes(16)])  # a block with no file is fine
    assert [os.path.exists(tier.file_of(h)) for h in hashes] == [False, False, True, True, True]
    assert tier.dir.lookup(hashes[2:]) == 3 and tier.dir.lookup(hashes) == 0
    got, bad = load(tier, hashes[2:])
    assert bad == [] and torch.equal(got, rows[2:])
    tier.dir.check()


def test_removed_files_are_recycled_by_later_writes(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path, capacity=3, spare_files=2)
    hashes, metas = chain(7)
    rows = random_rows(7)
    store(tier, hashes[:3], metas[:3], rows[:3])
    plan = store(tier, hashes[3:6], metas[3:6], rows[3:6])
    assert plan.evicted == hashes[:3] and tier.recycled == 0
    tier.removed(plan.evicted)  # two become spares, the third is deleted
    assert not any(os.path.exists(tier.file_of(h)) for h in hashes[:3])
    assert len(list(tier.path.glob("*/.tmp-*"))) == 2

    plan = store(tier, hashes[6:], metas[6:], rows[6:])
    assert tier.recycled == 1 and len(list(tier.path.glob("*/.tmp-*"))) == 1
    assert os.path.getsize(tier.file_of(hashes[6])) == tier.file_bytes
    tier.removed(plan.evicted)
    got, bad = load(tier, hashes[4:])
    assert bad == [] and torch.equal(got, rows[4:])
    tier.dir.check()
    tier.close()
    assert list(tier.path.glob("*/.tmp-*")) == []  # close deletes the spares

    again = make_tier(tmp_path, capacity=3)
    assert (again.scan_found, again.scan_removed) == (3, 0)
    got, bad = load(again, hashes[4:])
    assert bad == [] and torch.equal(got, rows[4:])
    again.dir.check()


def test_ttl_carries_across_a_restart(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    hashes, metas = chain(2)
    store(tier, hashes, metas, random_rows(2))
    tier.close()
    now_s = int(os.stat(tier.file_of(hashes[0])).st_mtime)
    os.utime(tier.file_of(hashes[0]), (now_s - 1000, now_s - 1000))  # idle past the TTL: deleted
    os.utime(tier.file_of(hashes[1]), (now_s - 50, now_s - 50))  # 50 s of its 100 used up

    clock = [10_000.0]
    again = make_tier(tmp_path, ttl_s=100.0, clock=lambda: clock[0])
    assert (again.scan_found, again.scan_removed) == (1, 1)
    assert not os.path.exists(again.file_of(hashes[0]))
    assert again.dir.lookup(hashes[1:]) == 1
    clock[0] += 70  # ~120 s idle now
    assert again.dir.expire() == [hashes[1]]
    again.dir.check()


def test_a_second_tier_on_the_same_directory_is_disabled(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    first = make_tier(tmp_path)
    second = make_tier(tmp_path)
    assert first.enabled and not second.enabled
    assert second.disabled_reason is not None and "in use" in second.disabled_reason
    assert len(warnings_of(caplog)) == 1
    first.close()
    assert make_tier(tmp_path).enabled


def _check_disabled_at_startup(tier: DiskTier, caplog: pytest.LogCaptureFixture) -> None:
    assert not tier.enabled and tier.disabled_reason is not None
    assert tier.capacity_blocks == 0 and tier.nbytes == 0
    hashes, metas = chain(3)
    assert tier.dir.prepare_store(hashes, metas).hashes == []  # nothing can even be reserved
    for h in hashes:  # and a write, were one attempted, fails without touching the disk
        with pytest.raises(TierError, match="disabled"):
            tier.write(StorePlan([h], [0]), random_rows(1), [0])
    assert len(warnings_of(caplog)) == 1
    tier.dir.check()


def test_a_root_that_cannot_be_created_disables_the_tier_with_one_warning(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _check_disabled_at_startup(make_tier(blocker / "cache"), caplog)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_root_disables_the_tier_with_one_warning(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        _check_disabled_at_startup(make_tier(root), caplog)
    finally:
        root.chmod(0o700)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_mid_run_disables_the_tier_after_one_warning(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = make_tier(tmp_path)
    hashes, metas = chain(6)
    rows = random_rows(6)
    store(tier, hashes[:1], metas[:1], rows[:1])

    real_writev = os.writev
    calls: list[int] = []

    def fills_up(fd: int, bufs: list[memoryview]) -> int:
        calls.append(fd)
        if len(calls) >= 2:  # the plan's first block fits, its second does not
            raise OSError(code, os.strerror(code))
        return real_writev(fd, bufs)

    monkeypatch.setattr(os, "writev", fills_up)
    plan = tier.dir.prepare_store(hashes[1:4], metas[1:4])
    with pytest.raises(TierError):
        tier.write(plan, rows, [1, 2, 3])
    tier.dir.complete_store(plan, ok=False)
    for h in hashes[4:]:
        plan = tier.dir.prepare_store([h], [metas[hashes.index(h)]])
        with pytest.raises(TierError, match="disabled"):
            tier.write(plan, rows, [hashes.index(h)])
        tier.dir.complete_store(plan, ok=False)
    monkeypatch.undo()

    assert len(calls) == 2  # a disabled tier does not touch the disk
    assert len(warnings_of(caplog)) == 1
    assert not tier.enabled and tier.disabled_reason is not None and os.strerror(code) in tier.disabled_reason
    # The failed plan left nothing behind: neither its first block's file nor a temp file.
    assert not any(os.path.exists(tier.file_of(h)) for h in hashes[1:])
    assert list(tier.path.glob("*/.tmp-*")) == []
    assert tier.dir.lookup(hashes) == 1
    got, bad = load(tier, hashes[:1])  # what is on disk still loads
    assert bad == [] and torch.equal(got, rows[:1])
    tier.dir.check()
    # A disabled tier keeps no spares: dropping a block frees its space.
    assert tier.dir.discard(hashes[0])
    tier.removed(hashes[:1])
    assert not os.path.exists(tier.file_of(hashes[0])) and list(tier.path.glob("*/.tmp-*")) == []
    tier.dir.check()


def test_an_unwritable_file_on_replace_disables_the_tier(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = make_tier(tmp_path)
    hashes, metas = chain(3)

    def denied(src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", denied)
    for i in range(3):
        plan = tier.dir.prepare_store(hashes[i : i + 1], metas[i : i + 1])
        with pytest.raises(TierError):
            tier.write(plan, random_rows(1), [0])
        tier.dir.complete_store(plan, ok=False)
    assert len(warnings_of(caplog)) == 1 and not tier.enabled
    assert tier.write_errors == 1
    monkeypatch.undo()
    assert list(tier.path.glob("*/.tmp-*")) == []
    tier.dir.check()


def test_another_io_error_fails_only_that_write(
        tmp_path: Path, make_tier: MakeTier, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = make_tier(tmp_path)
    hashes, metas = chain(2)
    rows = random_rows(2)

    def io_error(fd: int, bufs: list[memoryview]) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "writev", io_error)
    plan = tier.dir.prepare_store(hashes[:1], metas[:1])
    with pytest.raises(TierError):
        tier.write(plan, rows, [0])
    tier.dir.complete_store(plan, ok=False)
    monkeypatch.undo()
    assert tier.enabled and warnings_of(caplog) == [] and tier.write_errors == 1
    store(tier, hashes, metas, rows)
    got, bad = load(tier, hashes)
    assert bad == [] and torch.equal(got, rows)
    tier.dir.check()
