"""Shared-memory KV tensors: the same-host fast path of the transfer data plane.

A prefill worker allocates its CPU KV cache with :func:`allocate_shared_kv` (or
:meth:`SharedKV.create`): the tensor is a mapping of a file in ``/dev/shm``, so a decode worker
on the same host can map the file read-only and copy blocks straight out of it, with the TCP
connection kept only for control (handshake, lease pinning, checksums, errors). The transfer
server finds out by itself that its tensor is shared (:func:`offer_for`).

Lifetime. The file is ``/dev/shm/kvbaton-kv-<pid>-<random>``, mode 0600 (only this user's
processes can map it, and they could read this process's memory anyway). Its creator unlinks
it on :meth:`SharedKV.close`, when the last view of the tensor is garbage collected, and at
interpreter exit. Unlinking only stops new peers from opening it; mappings that exist stay
valid and the memory is returned when the last one goes. Leak window: a creator killed by a
signal that skips ``atexit`` (SIGKILL, the OOM killer) leaves its file behind. Each creator
holds a shared ``flock`` on its file for its whole life, so the next :meth:`SharedKV.create` on
the host, of any process, removes files whose lock nobody holds any more.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import socket
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import wire

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "kvbaton-kv-"
_TMP_PREFIX = ".kvbaton-kv-new-"  # created and locked under this name, then renamed: see _sweep


@lru_cache(maxsize=1)
def host_id() -> str:
    """This host's identity: kernel boot id and hostname. Two processes that share it may share
    memory; a client still checks that it can open the offered file, so containers with separate
    ``/dev/shm`` fall back to TCP."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{boot}/{socket.gethostname()}"


@dataclass(frozen=True)
class _Region:
    path: str
    base: int  # address of the mapping in this process
    size: int
    dev: int
    ino: int


_regions: dict[str, _Region] = {}
_regions_lock = threading.Lock()


class SharedKV:
    """A zeroed block-first KV tensor whose memory is a file in ``/dev/shm``.

    ``tensor`` is ``[num_blocks, *spec.block_shape()]`` of ``spec``'s dtype. Keep using it after
    :meth:`close` if you like: close only unlinks the file (no new peer can map it).
    """

    def __init__(self, tensor: torch.Tensor, path: str) -> None:
        self.tensor = tensor
        self.path = path

    @classmethod
    def create(cls, spec: KVSpec, num_blocks: int, directory: str = SHM_DIR) -> SharedKV:
        """Allocate the file (all of it, up front) and map it.

        Raises OSError naming the size and directory when the file system cannot hold it (a
        Docker container's ``/dev/shm`` is 64 MiB unless ``--shm-size`` says otherwise):
        reserving up front turns that into an error here instead of a SIGBUS in a later write.
        """
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        _sweep(directory)
        size = num_blocks * spec.bytes_per_block
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        tmp = os.path.join(directory, _TMP_PREFIX + token)
        path = os.path.join(directory, PREFIX + token)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # "alive" marker for _sweep; released when we die
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot reserve {size / 2**20:.1f} MiB for the KV cache in {directory} ({exc.strerror}); "
                    "enlarge it (docker --shm-size) or allocate the KV cache privately",
                ) from None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            os.close(fd)
            raise
        st = os.fstat(fd)
        flat = torch.frombuffer(mm, dtype=spec.torch_dtype)
        region = _Region(path, flat.data_ptr(), size, st.st_dev, st.st_ino)
        with _regions_lock:
            _regions[path] = region
        # The mapping lives as long as any view of the tensor (the storage holds ``mm``); the
        # finalizer also runs at interpreter exit.
        weakref.finalize(mm, _retire, path, fd)
        return cls(flat.view(num_blocks, *spec.block_shape()), path)

    def close(self) -> None:
        """Unlink the file: peers that have it mapped keep reading, new ones fall back to TCP."""
        _unlink(self.path)


def allocate_shared_kv(spec: KVSpec, num_blocks: int) -> torch.Tensor:
    """A zeroed CPU KV tensor in shared memory, or a private one (with a warning) when
    ``/dev/shm`` cannot hold it; either way the transfer server serves it, shared ones faster."""
    try:
        return SharedKV.create(spec, num_blocks).tensor
    except OSError as exc:
        log.warning("KV cache not in shared memory, same-host transfers will use TCP: %s", exc)
        return spec.allocate(num_blocks, "cpu")


def offer_for(kv: torch.Tensor, block_bytes: int) -> wire.ShmOffer | None:
    """The offer describing ``kv`` when it lies inside a live :class:`SharedKV` file, else None."""
    if kv.device.type != "cpu" or not kv.is_contiguous():
        return None
    start, nbytes = kv.data_ptr(), kv.numel() * kv.element_size()
    with _regions_lock:
        regions = list(_regions.values())
    for r in regions:
        if r.base <= start and start + nbytes <= r.base + r.size:
            return wire.ShmOffer(host_id(), r.path, r.size, r.dev, r.ino, start - r.base, kv.shape[0], block_bytes)
    return None


def is_offered(offer: wire.ShmOffer) -> bool:
    """Whether the offered file is still registered (not closed) in this process."""
    with _regions_lock:
        return offer.path in _regions


def _unlink(path: str) -> None:
    with _regions_lock:
        _regions.pop(path, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _retire(path: str, fd: int) -> None:
    _unlink(path)
    os.close(fd)  # drops the flock


def _sweep(directory: str) -> None:
    """Remove this user's KV files left by processes that died without unlinking them.

    A live creator holds a shared flock on its file, so an exclusive one succeeds only on
    orphans. Files are locked before they get their final name, so no half-made file is seen.
    """
    try:
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # someone holds it: alive
        finally:
            os.close(fd)
        log.info("removing orphaned shared KV file %s", path)
        try:
            os.unlink(path)
        except OSError:
            pass
