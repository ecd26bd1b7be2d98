"""Reader side of the shared-memory path: map a peer's offered KV file read-only and copy
verified blocks out of it.

Each block is copied once, from the mapping straight into its destination block (or into the
pinned staging buffer on CUDA), and checksummed right after while it is still in cache, so the
check costs a fraction of the copy. ``numpy.copyto`` and the checksum both release the GIL.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

from kvbaton.kv.codec import checksum
from kvbaton.kv.transfer import wire
from kvbaton.kv.transfer.blocks import BlockIO
from kvbaton.kv.transfer.shm import PREFIX, SHM_DIR, host_id
from kvbaton.kv.transfer.transport import ChecksumError, ProtocolError


class ShmMapping:
    """A read-only mapping of one peer's shared KV file, as ``rows[block_id]`` of block bytes.

    The mapping is released when this object and every array taken from it are gone.
    """

    def __init__(self, offer: wire.ShmOffer, rows: np.ndarray) -> None:
        self.offer = offer
        self.rows = rows

    @classmethod
    def open(cls, offer: wire.ShmOffer, block_bytes: int) -> ShmMapping:
        """Map ``offer``'s file; OSError if it cannot be opened, ValueError if it is not the
        file described (another host, another file under that name, a layout that disagrees)."""
        if offer.host_id != host_id():
            raise ValueError(f"offered by host {offer.host_id!r}, this is {host_id()!r}")
        if os.path.dirname(offer.path) != SHM_DIR or not os.path.basename(offer.path).startswith(PREFIX):
            raise ValueError(f"{offer.path!r} is not a kvbaton KV file in {SHM_DIR}")
        if offer.block_bytes != block_bytes:
            raise ValueError(f"offered blocks of {offer.block_bytes} bytes, the spec has {block_bytes}")
        if offer.offset < 0 or offer.num_blocks < 1 or offer.offset + offer.num_blocks * block_bytes > offer.size:
            raise ValueError(
                f"offered {offer.num_blocks} blocks at offset {offer.offset} do not fit {offer.size} bytes"
            )
        fd = os.open(offer.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != (offer.dev, offer.ino, offer.size):
                raise ValueError(f"{offer.path!r} is not the offered file (another /dev/shm, or replaced)")
            mm = mmap.mmap(fd, offer.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        rows = np.frombuffer(mm, np.uint8, offer.num_blocks * block_bytes, offer.offset)
        return cls(offer, rows.reshape(offer.num_blocks, block_bytes))

    def copy_verified(
        self,
        src_block_ids: Sequence[int],
        checksums: Sequence[int],
        io: BlockIO,
        block_indexes: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        """Copy ``rows[src_block_ids[i]]`` into ``io``'s block ``dst_block_ids[i]`` and verify it
        against ``checksums[i]``; ChecksumError names the first block that fails."""
        n = len(dst_block_ids)
        if len(src_block_ids) != n or len(checksums) != n:
            raise ProtocolError(
                f"server answered {len(src_block_ids)} blocks and {len(checksums)} checksums; asked for {n}"
            )
        bad = [b for b in src_block_ids if not 0 <= b < len(self.rows)]
        if bad:
            raise ProtocolError(f"server named blocks {bad[:5]} outside its {len(self.rows)} shared blocks")
        rows = self.rows
        for chunk in io.write(dst_block_ids):
            for k, view in enumerate(chunk.blocks):
                pos = chunk.start + k
                dst = np.frombuffer(view, np.uint8)
                np.copyto(dst, rows[src_block_ids[pos]])
                if checksum(dst) != checksums[pos]:
                    raise ChecksumError.at(pos, block_indexes, dst_block_ids)
