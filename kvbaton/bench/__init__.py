"""Benchmark harness: load generation against any OpenAI-compatible endpoint.

``corpus`` holds the bundled text corpus (English prose and source code) and token-level
sampling helpers; ``workloads`` turns it into seeded, reproducible request sessions
(random, shared-prefix, multi-turn, mixed, trace replay); the load runner, metrics and
reports drive those sessions against a server. Nothing here imports engine internals.
"""
