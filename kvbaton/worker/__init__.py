"""One worker process: the engine loop on its own thread, an OpenAI-compatible HTTP API,
Prometheus metrics and (later) the KV transfer server and events publisher.

Entry points: :func:`kvbaton.worker.server.run_worker` (blocking, for the CLI) and
:class:`kvbaton.worker.server.WorkerThread` (in-process, for tests and notebooks).
"""
