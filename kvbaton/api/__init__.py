"""The OpenAI-compatible HTTP front door that the worker and the router both serve: wire
models and error shapes (``protocol``), the request preamble and the API's settings
(``frontdoor``), server-sent events and client disconnects (``sse``), auth and size limits
(``guard``), shared metric buckets (``metrics``) and the uvicorn wiring (``server``).

It imports neither torch nor the engine, so the router process never loads them.
"""
