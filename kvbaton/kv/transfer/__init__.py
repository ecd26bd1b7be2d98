"""KV transfer data plane: moves leased KV blocks from a prefill worker to a decode worker.

Pick an implementation by the two interfaces in ``transport`` (``Transport`` for the client,
``TransportServer`` for the server); TCP is the one built in.
"""

from kvbaton.kv.transfer.tcp import TransferClient
from kvbaton.kv.transfer.tcp_server import Faults, ServerStats, TransferServer
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
    "SpecMismatch",
    "TransferClient",
    "TransferError",
    "TransferServer",
    "TransferTimeout",
    "Transport",
    "TransportServer",
]
