"""What stands between the socket and the routes: API-key auth, the request-size limit, and
turning every failure into an OpenAI-shaped error body.

The guard is plain ASGI (no ``BaseHTTPMiddleware``) so it never buffers or wraps responses,
which would break streaming; it buffers only request bodies, which the routes read whole
anyway, and refuses them once they pass the limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvbaton.api.protocol import ApiError

log = logging.getLogger(__name__)

# Readable without the API key: liveness probes and Prometheus scrapes.
OPEN_PATHS = frozenset({"/health", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def send_error(send: Send, err: ApiError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(err.body()).encode()
    await send({
        "type": "http.response.start",
        "status": err.status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": data})


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], api_key: str | None) -> bool:
    """Whether raw ASGI ``headers`` carry ``Authorization: Bearer <api_key>`` (True when no key
    is set: there is nothing to match). The one check of the key, for the guard and for open
    routes that show more to callers who have it."""
    if api_key is None:
        return True
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())
    return False


class RequestGuard:
    """ASGI middleware: bearer-token check (when ``api_key`` is set) and body-size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int,
                 body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        return bearer_matches(scope.get("headers", ()), self.api_key)

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"request body exceeds the limit of {self.max_bytes} bytes", None,
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            err = ApiError(401, "missing or invalid API key (expected 'Authorization: Bearer <key>')",
                           None, "invalid_api_key")
            await send_error(send, err, [(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, ApiError(400, "invalid Content-Length header", None, "invalid_value"))
                    return
                if declared > self.max_bytes:
                    await send_error(send, self._too_large())
                    return
        chunks: list[bytes] = []
        size = 0
        try:
            # A client that stops sending its body mid-way must not hold the connection.
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > self.max_bytes:
                        await send_error(send, self._too_large())
                        return
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await send_error(send, ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                            None, "request_timeout"), [(b"connection", b"close")])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _loc_str(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as an ApiError naming the top-level field."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request", None, "invalid_value")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
        return ApiError(400, f"malformed JSON body: {detail}", None, "invalid_json")
    fields = loc[1:] if loc and loc[0] == "body" else loc
    if not fields:
        if kind == "missing":
            return ApiError(400, "request body is missing; expected a JSON object", None, "invalid_json")
        return ApiError(400, f"request body must be a JSON object: {err.get('msg', '')}", None, "invalid_type")
    param = str(fields[0])
    # Drop pydantic's union-member tags ("str", "list[int]") from the path. A validator of
    # the request models may name the exact place itself (ctx "field_path", e.g. the list
    # item of ``stop`` it checked), as its error is raised for the whole field.
    field_path = (err.get("ctx") or {}).get("field_path")
    if isinstance(field_path, str):
        path = field_path
    else:
        path = _loc_str(p for p in fields if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    return ApiError(400, f"{path or param}: {err.get('msg', 'invalid value')}", param, code)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers with ``{"error": {...}}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 is a body it could not parse (bytes that are not UTF-8, say).
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
        err = ApiError(exc.status_code, str(exc.detail), None, codes.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = ApiError(500, f"internal error: {type(exc).__name__}", None, "internal_error")
        return JSONResponse(err.body(), status_code=500)
