"""Model architectures, weight loading and tokenizers (no requests, batching or network)."""
