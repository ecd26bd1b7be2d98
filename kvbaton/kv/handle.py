"""KVHandle: what a prefill worker hands the decode side so it can fetch a prompt's KV.

It travels inside the OpenAI API as ``kv_transfer_params`` (as in vLLM and llm-d): the prefill
worker returns it, the router forwards it unchanged to the decode worker. Field names follow
vLLM's ``remote_host`` / ``remote_port`` / ``remote_engine_id`` where they mean the same thing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvbaton.kv.hashing import HASH_BYTES, BlockHash


@dataclass(frozen=True)
class KVHandle:
    """Where a prompt's KV lives, under which lease, and the token sampled after it.

    ``block_hashes`` name the full blocks of the prompt, in order; when the prompt does not
    end on a block boundary the lease holds one more block, the partial tail, with
    ``tail_tokens`` tokens. Lease-relative block ``i`` is ``block_hashes[i]`` for full blocks
    and the tail after them.
    """

    remote_engine_id: str
    remote_host: str
    remote_port: int
    lease_id: str
    lease_ttl_s: float
    model_fingerprint: str
    block_size: int
    block_hashes: tuple[BlockHash, ...]
    num_prompt_tokens: int
    first_token_id: int
    first_token_logprob: float | None = None
    finish_reason: str | None = None
    # HMAC-SHA256 (hex) of every other field under the cluster's KV transfer secret, set by
    # the prefill worker: a decode worker with the secret fetches nothing for a handle whose
    # signature does not verify (forged by a client, or from a peer with another secret).
    signature: str | None = None

    def _mac(self, secret: bytes) -> str:
        """HMAC-SHA256 (hex) of every field but ``signature``, canonically encoded."""
        d = asdict(self)
        d.pop("signature")
        d["block_hashes"] = [h.hex() for h in self.block_hashes]
        payload = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(secret, payload, hashlib.sha256).hexdigest()

    def signed(self, secret: bytes) -> KVHandle:
        """This handle with its signature under ``secret``."""
        # Signed in the form a receiver parses (a NaN logprob becomes None there), so both
        # sides hash the same bytes.
        parsed = KVHandle.from_dict({**self.to_dict(), "signature": None})
        return replace(self, signature=parsed._mac(secret))

    def verify(self, secret: bytes) -> bool:
        """Whether the signature is this handle's under ``secret`` (False when unsigned)."""
        return bool(self.signature) and hmac.compare_digest(self._mac(secret), self.signature or "")

    @property
    def tail_tokens(self) -> int:
        return self.num_prompt_tokens % self.block_size

    @property
    def num_blocks(self) -> int:
        """Blocks under the lease: full blocks plus the tail, if any."""
        return len(self.block_hashes) + (1 if self.tail_tokens else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_hashes"] = [h.hex() for h in self.block_hashes]
        d["tail_tokens"] = self.tail_tokens
        d["do_remote_prefill"] = True
        return d

    @classmethod
    def from_dict(cls, d: Any) -> KVHandle:
        """Parse and validate; ValueError names the first bad field."""
        if not isinstance(d, dict):
            raise ValueError("kv_transfer_params: must be an object")

        def get(name: str, typ: type | tuple[type, ...], optional: bool = False) -> Any:
            v = d.get(name)
            if v is None and optional:
                return None
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ValueError(f"kv_transfer_params.{name}: missing or of the wrong type")
            return v

        hashes_raw = get("block_hashes", list)
        hashes: list[BlockHash] = []
        for i, h in enumerate(hashes_raw):
            try:
                b = bytes.fromhex(h) if isinstance(h, str) else b""
            except ValueError:
                b = b""
            if len(b) != HASH_BYTES:
                raise ValueError(f"kv_transfer_params.block_hashes[{i}]: not a {HASH_BYTES}-byte hex hash")
            hashes.append(b)
        block_size = get("block_size", int)
        n = get("num_prompt_tokens", int)
        if block_size < 1 or n < 1 or n // block_size != len(hashes):
            raise ValueError(
                "kv_transfer_params.num_prompt_tokens: inconsistent with block_size and block_hashes"
            )
        port = get("remote_port", int)
        if not 0 < port < 65536:
            raise ValueError("kv_transfer_params.remote_port: out of range")
        lp = get("first_token_logprob", (int, float), optional=True)
        if lp is not None and math.isnan(lp):
            lp = None
        return cls(
            remote_engine_id=get("remote_engine_id", str),
            remote_host=get("remote_host", str),
            remote_port=port,
            lease_id=get("lease_id", str),
            lease_ttl_s=float(get("lease_ttl_s", (int, float))),
            model_fingerprint=get("model_fingerprint", str),
            block_size=block_size,
            block_hashes=tuple(hashes),
            num_prompt_tokens=n,
            first_token_id=get("first_token_id", int),
            first_token_logprob=None if lp is None else float(lp),
            finish_reason=get("finish_reason", str, optional=True),
            signature=get("signature", str, optional=True),
        )
