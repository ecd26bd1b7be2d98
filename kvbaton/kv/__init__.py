"""The KV cache as a primitive: block identity, layout, events (and later transfer, tiers, index)."""
