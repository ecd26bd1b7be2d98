"""KV transfer data plane: moves leased KV blocks from a prefill worker to a decode worker.

Pick an implementation by the two interfaces in ``transport`` (``Transport`` for the client,
``TransportServer`` for the server); TCP is the one built in, with a same-host shared-memory
fast path for a KV cache allocated by ``allocate_shared_kv`` / ``SharedKV`` (``shm``).
"""

from kvbaton.kv.transfer.server_state import Faults, ServerStats
from kvbaton.kv.transfer.shm import SharedKV, allocate_shared_kv
from kvbaton.kv.transfer.tcp import TransferClient
from kvbaton.kv.transfer.tcp_server import TransferServer
from kvbaton.kv.transfer.transport import (
    AuthError,
    BlockSource,
    ChecksumError,
    FetchStats,
    LeaseError,
    PeerClosed,
    ProtocolError,
    SpecMismatch,
    TransferError,
    TransferTimeout,
    Transport,
    TransportServer,
)

__all__ = [
    "AuthError",
    "BlockSource",
    "ChecksumError",
    "Faults",
    "FetchStats",
    "LeaseError",
    "PeerClosed",
    "ProtocolError",
    "ServerStats",
    "SharedKV",
    "SpecMismatch",
    "TransferClient",
    "TransferError",
    "TransferServer",
    "TransferTimeout",
    "Transport",
    "TransportServer",
    "allocate_shared_kv",
]
