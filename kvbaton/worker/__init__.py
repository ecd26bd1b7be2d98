"""One worker process: the engine loop on its own thread, an OpenAI-compatible HTTP API,
Prometheus metrics, the KV transfer server (prefill-capable roles) and the KV events
publisher (unless ``--no-kv-events``).

Entry points: :func:`kvbaton.worker.server.run_worker` (blocking, for the CLI) and
:class:`kvbaton.worker.server.WorkerThread` (in-process, for tests and notebooks).
"""
