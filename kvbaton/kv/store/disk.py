"""The disk tier: whole KV blocks as files in a directory that outlives the worker.

Layout. ``root/<model>/<hh>/<hash hex>.kvb``: ``<model>`` is the first 16 hex characters of
SHA-256 over the model fingerprint and the KV layout id, so two models (or two layouts of one
model) sharing a root never see each other's files; ``<hh>`` is the first two hex characters of
the block hash (256 subdirectories, so no directory grows past what its lookups handle well).
A ``lock`` file in ``<model>`` is held (``flock``) while a tier uses the directory: a second
worker pointed at the same directory disables its disk tier instead of evicting and deleting
the first one's blocks.

One file per block, not a few large files: ``os.replace`` of a finished temp file makes each
block's write atomic with no journal; dropping a block is one ``unlink`` (O(1)) that frees its
space, so there is no slot allocator, free list or compaction to write and get wrong;
a torn or corrupted file costs only its own block; and the kernel's page cache keeps the hot
blocks in memory with no cache of our own. The cost is an open/close and an inode per block.

Recycling. Creating a file (a new inode, new blocks, new page-cache pages) is the dominant cost
of a write on some machines (a VM's ext4 measured ~0.3-1 ms per create, against ~0.1 ms to
overwrite a cached file), and a full tier evicts one block for every block it writes. So
``removed`` renames up to ``spare_files`` evicted files to temp names instead of deleting them,
and ``write`` overwrites a spare in place (every file has the same size) before renaming it to
its block's name: still atomic, since a spare is never under a block's name while it is
rewritten. Spares are temp files: ``close`` and the next startup scan delete them. Disk use is
at most ``capacity_blocks + spare_files`` files. ``benchmarks/kv_disk_tier.py`` measures both.

File format: :mod:`kvbaton.kv.store.blockfmt` (the header a remote tier's values carry too),
with the payload offset P padded to a multiple of 4096 fixed per tier, so every file has one
size and the payload starts on a page boundary: every page-cache page maps to one contiguous
piece of the destination row (and O_DIRECT remains possible later).

Threads follow :mod:`kvbaton.kv.store.base`: the constructor (which scans the directory) and
the metadata run on the engine thread; ``write``, ``read`` and ``removed`` run on the IO thread
and never change the :class:`BlockDirectory`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvbaton.kv.codec import checksum, host_bytes
from kvbaton.kv.hashing import HASH_BYTES, BlockHash
from kvbaton.kv.store.base import BlockDirectory, BlockMeta, KVTier, LoadPlan, StorePlan, TierError
from kvbaton.kv.store.blockfmt import BlockFormat, BlockHeader
from kvbaton.kv.store.policies import EvictionPolicy

log = logging.getLogger(__name__)

DISK_MEDIUM = "DISK"
BLOCK_SUFFIX = ".kvb"
TMP_PREFIX = ".tmp-"  # <TMP_PREFIX><pid>-<random>: a write in progress, a spare, or a leftover
LOCK_NAME = "lock"
PAGE_BYTES = 4096
DEFAULT_SPARE_FILES = 64

_SUBDIRS = [f"{i:02x}" for i in range(256)]
# Errors that say the medium as a whole takes no more writes (full, read-only, no permission):
# retrying block by block would only fail again, so the tier turns itself off.
_DISABLING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def model_dir_name(model_fingerprint: str, layout_id: str) -> str:
    """The name of one model's (and layout's) subdirectory under a disk tier's root."""
    return hashlib.sha256((model_fingerprint + layout_id).encode()).hexdigest()[:16]


class DiskTier(KVTier):
    """Whole blocks as files under ``root`` (see the module docstring for layout and format).

    A startup problem (the root cannot be created, is not writable, or another worker holds it)
    does not raise: the tier starts disabled (capacity 0) with one warning, so the worker serves
    without it. A full or unwritable disk later disables it the same way (``disabled_reason``);
    blocks already on disk stay loadable.
    """

    name = "disk"
    medium = DISK_MEDIUM

    def __init__(self, root: Path | str, capacity_blocks: int, block_bytes: int, block_size: int,
                 layout_id: str, model_fingerprint: str, policy: EvictionPolicy[BlockHash],
                 ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 spare_files: int = DEFAULT_SPARE_FILES) -> None:
        if capacity_blocks < 1:
            raise ValueError("the disk tier needs at least one block of capacity")
        if spare_files < 0:
            raise ValueError("spare_files must be >= 0")
        if block_bytes < 1 or block_size < 1:
            raise ValueError("block_bytes and block_size must be >= 1")
        self.root = Path(root)
        self.path = self.root / model_dir_name(model_fingerprint, layout_id)
        self.layout_id = layout_id
        self.model_fingerprint = model_fingerprint
        self.block_size = block_size
        # The largest header this tier can write, rounded up to whole pages: every file then
        # has the same size, which the scan checks from a stat.
        widest = BlockFormat(layout_id, model_fingerprint, block_bytes, block_size).widest_header()
        self.payload_offset = -(-widest // PAGE_BYTES) * PAGE_BYTES
        self.format = BlockFormat(layout_id, model_fingerprint, block_bytes, block_size, self.payload_offset)
        self.disabled_reason: str | None = None
        self.scan_found = 0  # valid blocks the startup scan registered
        self.scan_removed = 0  # files it deleted: leftovers, invalid, over capacity, expired
        self.write_errors = 0
        self.read_bad = 0  # blocks a read rejected (and deleted)
        self.remove_errors = 0
        self.recycled = 0  # writes that overwrote a spare instead of creating a file
        self.spare_files = spare_files
        self._spares: list[str] = []  # IO thread only (removed, write): renamed files of dropped blocks
        self._base = str(self.path)
        self._pid = os.getpid()
        self._rng = random.Random()
        self._lock_fd: int | None = None
        self._closed = False
        problem = self._open_medium()
        directory = BlockDirectory(capacity_blocks if problem is None else 0, policy, block_size,
                                   self.medium, ttl_s, clock)
        super().__init__(directory, block_bytes)
        if problem is not None:
            self._disable(problem)
        else:
            self._scan(capacity_blocks, ttl_s)

    # ---- properties --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False once the tier stopped taking blocks (startup failure, full or unwritable disk)."""
        return self.disabled_reason is None and not self._closed and super().enabled

    @property
    def nbytes(self) -> int:
        """Capacity in payload bytes."""
        return self.capacity_blocks * self.block_bytes

    @property
    def file_bytes(self) -> int:
        """The size of one block file (header page(s) + payload): every file has this size."""
        return self.payload_offset + self.block_bytes

    def file_of(self, h: BlockHash) -> str:
        """The path of block ``h``'s file."""
        hx = h.hex()
        return f"{self._base}/{hx[:2]}/{hx}{BLOCK_SUFFIX}"

    # ---- IO thread ---------------------------------------------------------------------

    def write(self, plan: StorePlan, rows: torch.Tensor, row_ids: Sequence[int]) -> None:
        """IO thread: write ``rows[row_ids[i]]`` as ``plan.hashes[i]``'s file, atomically.

        On failure the files this call already wrote are deleted (the engine drops the whole
        plan with ``complete_store(ok=False)``) and :class:`TierError` is raised; a full or
        unwritable disk also disables the tier, and a disabled tier raises at once.
        """
        if self.disabled_reason is not None or self._closed:
            raise TierError(f"the disk tier is disabled: {self.disabled_reason or 'closed'}")
        self._check_rows(rows, plan.hashes, row_ids)
        written: list[str] = []
        for h, meta, r in zip(plan.hashes, plan.metas, row_ids):
            try:
                written.append(self._write_file(h, meta, host_bytes(rows[r])))
            except OSError as e:
                self.write_errors += 1
                for path in written:
                    _unlink_quiet(path)
                if e.errno in _DISABLING_ERRNOS:
                    self._disable(f"cannot write to {self.path}: {e}")
                elif isinstance(e, FileNotFoundError) and not os.path.isdir(self._base):
                    self._disable(f"{self.path} vanished")
                raise TierError(f"disk tier: writing block {h.hex()} failed: {e}") from e

    def read(self, plan: LoadPlan, rows: torch.Tensor, row_ids: Sequence[int]) -> list[BlockHash]:
        """IO thread: read each block's file straight into ``rows[row_ids[i]]`` and validate it
        (header, size, checksum). Blocks that fail, or whose file is missing, are returned (and
        their files deleted, so they are never loaded again); their rows hold garbage.

        Raises :class:`TierError` when the medium fails as a whole: the model's directory is
        gone, or every block of the plan hit an I/O error (their files are then kept: the disk
        may come back, and a failed load is only a miss)."""
        self._check_rows(rows, plan.hashes, row_ids)
        header_buf = bytearray(self.payload_offset)
        bad: list[BlockHash] = []
        io_failed: list[tuple[BlockHash, OSError]] = []
        for h, r in zip(plan.hashes, row_ids):
            path = self.file_of(h)
            try:
                ok = self._read_file(path, h, header_buf, host_bytes(rows[r]))
            except FileNotFoundError:
                if not os.path.isdir(self._base):
                    raise TierError(f"disk tier: {self.path} vanished") from None
                ok = False  # deleted behind our back: a miss, like a corrupt block
            except OSError as e:
                io_failed.append((h, e))
                continue
            if not ok:
                bad.append(h)
                _unlink_quiet(path)
        if io_failed and len(io_failed) == len(plan.hashes):
            first, error = io_failed[0]
            raise TierError(f"disk tier: all {len(io_failed)} reads failed, first {first.hex()}: {error}") from error
        for h, _ in io_failed:
            bad.append(h)
            _unlink_quiet(self.file_of(h))
        self.read_bad += len(bad)
        return bad

    def removed(self, hashes: Sequence[BlockHash]) -> None:
        """IO thread: the directory dropped ``hashes``: their files stop being findable at once
        (missing is fine). Up to ``spare_files`` are kept, renamed, for writes to overwrite; the
        rest are deleted, and all are once the tier is disabled (it frees the space)."""
        for h in hashes:
            path = self.file_of(h)
            try:
                if len(self._spares) < self.spare_files and self.disabled_reason is None and not self._closed:
                    spare = self._tmp_name(path.rsplit("/", 1)[0])
                    os.rename(path, spare)
                    self._spares.append(spare)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                self.remove_errors += 1  # the file stays; the next startup scan accounts for it

    def close(self) -> None:
        """Stop taking blocks, delete the spares and release the directory's lock (block files
        stay for the next start). Call it once the IO thread has stopped."""
        self._closed = True
        while self._spares:
            _unlink_quiet(self._spares.pop())
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ---- files -------------------------------------------------------------------------

    def _tmp_name(self, sub: str) -> str:
        return f"{sub}/{TMP_PREFIX}{self._pid}-{self._rng.getrandbits(64):016x}"

    def _write_file(self, h: BlockHash, meta: BlockMeta, payload: memoryview) -> str:
        header = self._encode_header(h, meta, checksum(payload))
        path = self.file_of(h)
        fd = -1
        while self._spares and fd < 0:
            tmp = self._spares.pop()
            try:
                fd = os.open(tmp, os.O_WRONLY)
            except FileNotFoundError:
                pass  # deleted behind our back: try the next spare
        recycled = fd >= 0
        if not recycled:
            sub = path.rsplit("/", 1)[0]
            tmp = self._tmp_name(sub)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                # Someone removed the subdirectory: recreate it, but not the model directory (if
                # that is gone too, mkdir fails and the caller disables the tier).
                os.mkdir(sub)
                fd = os.open(tmp, flags, 0o644)
        try:
            try:
                _write_all(fd, [header, payload])
                if recycled and os.fstat(fd).st_size != self.file_bytes:
                    os.ftruncate(fd, self.file_bytes)  # a spare someone else resized
            finally:
                os.close(fd)
            # No fsync: after a power loss a file may be torn, empty or (recycled) still hold
            # its previous block, which its size, header hash or checksum check catches (it is
            # then deleted and the block recomputed). Syncing every block would cost far more
            # than the rare recompute; a killed process loses nothing (the page cache stays).
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        self.recycled += recycled
        return path

    def _read_file(self, path: str, h: BlockHash, header_buf: bytearray, payload: memoryview) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != self.file_bytes:
                return False
            # One readv: the header into header_buf, the payload straight into the row.
            if _read_all(fd, [header_buf, payload]) != self.file_bytes:
                return False
            header = self._parse_header(header_buf, h)
            if header is None or checksum(payload) != header.checksum:
                return False
            try:
                os.utime(fd)  # mtime = last use, so the LRU order a restart rebuilds counts loads
            except OSError:
                pass
            return True
        finally:
            os.close(fd)

    def _encode_header(self, h: BlockHash, meta: BlockMeta, payload_checksum: int) -> bytes:
        try:
            return self.format.encode(h, meta, payload_checksum)
        except ValueError as e:
            raise TierError(str(e)) from None

    def _parse_header(self, buf: bytearray, h: BlockHash) -> BlockHeader | None:
        """The header in ``buf`` if it is ours and names block ``h``; None otherwise."""
        parsed = self.format.parse(buf, h)
        return None if parsed is None else parsed[0]

    def _check_rows(self, rows: torch.Tensor, hashes: Sequence[BlockHash], row_ids: Sequence[int]) -> None:
        if (rows.device.type != "cpu" or rows.dtype != torch.uint8 or rows.dim() != 2
                or rows.shape[1] != self.block_bytes):
            raise ValueError(f"the disk tier moves CPU uint8 rows of {self.block_bytes} bytes, got "
                             f"{rows.dtype} {tuple(rows.shape)} on {rows.device}")
        if len(row_ids) != len(hashes):
            raise ValueError(f"{len(row_ids)} rows for {len(hashes)} blocks")

    # ---- startup (engine thread) -------------------------------------------------------

    def _open_medium(self) -> str | None:
        """Create the directories, take the lock, prove a file can be written; what went wrong."""
        try:
            for sub in _SUBDIRS:
                os.makedirs(self.path / sub, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return f"{self.path} is in use by another process (give each worker its own directory)"
            self._lock_fd = fd
            # An existing tree can still be read-only or full: write (and delete) one page.
            probe = self.path / _SUBDIRS[0] / f"{TMP_PREFIX}{self._pid}-probe"
            try:
                with open(probe, "wb") as f:
                    f.write(bytes(PAGE_BYTES))
            finally:
                _unlink_quiet(str(probe))
        except OSError as e:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            return f"cannot use {self.path}: {e}"
        return None

    def _scan(self, capacity: int, ttl_s: float) -> None:
        """Register the valid blocks already on disk, least recently used first.

        Only each file's header is read, never its payload, so a restart with a large cache
        starts fast; the payload's checksum is checked when the block is loaded. Deleted here:
        temp-file leftovers, files with a wrong size (truncated), a foreign or unreadable header
        or a wrong name, files idle past the TTL, and the oldest files beyond ``capacity``.
        """
        now_wall, now = time.time(), self.dir.clock()
        header_buf = bytearray(self.payload_offset)
        found: list[tuple[int, str, BlockHash, BlockMeta, float]] = []  # mtime_ns, path, hash, meta, age
        for sub in _SUBDIRS:
            try:
                entries = list(os.scandir(f"{self._base}/{sub}"))
            except FileNotFoundError:
                continue
            except OSError as e:
                self._disable(f"cannot scan {self.path}: {e}")
                break
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    self._scan_delete(entry.path)
                elif entry.name.endswith(BLOCK_SUFFIX):
                    try:
                        block = self._scan_file(entry, sub, header_buf)
                    except OSError:
                        block = None
                    if block is None:
                        self._scan_delete(entry.path)
                        continue
                    h, meta, st = block
                    age = max(0.0, now_wall - st.st_mtime)
                    if ttl_s > 0 and age > ttl_s:
                        self._scan_delete(entry.path)
                    else:
                        found.append((st.st_mtime_ns, entry.path, h, meta, age))
                # Anything else is not ours to delete.
        found.sort(key=lambda f: (f[0], f[1]))
        extra = max(0, len(found) - capacity)
        for _, path, _, _, _ in found[:extra]:
            self._scan_delete(path)
        for _, path, h, meta, age in found[extra:]:
            # last_used on the directory's clock, as long ago as the file was last written or
            # loaded, so the TTL and the LRU order carry across the restart.
            if self.dir.add_ready(h, meta, now - age) is None:
                self._scan_delete(path)
            else:
                self.scan_found += 1

    def _scan_file(self, entry: os.DirEntry[str], sub: str,
                   header_buf: bytearray) -> tuple[BlockHash, BlockMeta, os.stat_result] | None:
        hx = entry.name[: -len(BLOCK_SUFFIX)]
        if len(hx) != 2 * HASH_BYTES or hx != hx.lower() or hx[:2] != sub:
            return None
        try:
            h = bytes.fromhex(hx)
        except ValueError:
            return None
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size != self.file_bytes:
            return None
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            if _read_all(fd, [header_buf]) != len(header_buf):
                return None
        finally:
            os.close(fd)
        header = self._parse_header(header_buf, h)
        if header is None:
            return None
        return h, BlockMeta(header.parent, header.token_ids), st

    def _scan_delete(self, path: str) -> None:
        _unlink_quiet(path)
        self.scan_removed += 1

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:  # one warning, however many writes fail after it
            self.disabled_reason = reason
            log.warning("disk KV tier disabled: %s; offloading to disk stops, serving goes on", reason)
        while self._spares:  # no write will reuse them: give the space back (IO thread, from write)
            _unlink_quiet(self._spares.pop())


def _write_all(fd: int, bufs: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(b) for b in bufs]
    while views:
        n = os.writev(fd, views)
        if n == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _read_all(fd: int, bufs: Sequence[bytearray | memoryview]) -> int:
    """Fill ``bufs`` in order from ``fd``; the bytes read (short only at end of file)."""
    views = [memoryview(b) for b in bufs]
    total = 0
    while views:
        n = os.readv(fd, views)
        if n == 0:
            break
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
