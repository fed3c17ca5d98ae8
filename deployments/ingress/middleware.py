"""The ingress's ASGI middleware: request metrics, the body-size limit, CORS.

Wraps every route of the FastAPI app (`ingress/server.py` installs them); pure ASGI, so
streaming responses pass through untouched.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from deployments.ingress.auth import Guard, is_allowed_host
from deployments.ingress.errors import HostNotAllowed, error_response
from deployments.ingress.state import IngressState
from lenscore import TextTooLong

# Room in a body beyond its text: JSON escapes (up to 6 bytes a character, 8 allowed), options
# and up to 100_000 explicit positions.
BODY_BYTES_PER_TEXT_CHAR = 8
BODY_OVERHEAD_BYTES = 1 << 20


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template and status (pure ASGI: keeps streaming)."""

    def __init__(self, app: Any, state: IngressState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on and count its status once the response has started."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            params = scope.get("path_params", {})
            group = self.state.group_of_lens.get(params.get("lens_id", ""))
            group_id = group.group_id if group else params.get("group_id", "")
            if group_id not in self.state.groups:
                group_id = ""
            self.state.metrics.record_request(group_id, endpoint, status["code"])


def max_body_bytes(max_text_length: int) -> int:
    """Largest request body accepted for a `max_text_length` (characters) limit."""
    return BODY_BYTES_PER_TEXT_CHAR * max_text_length + BODY_OVERHEAD_BYTES


class BodySizeLimit:
    """Refuse a request body over the limit with 413, whether declared or streamed.

    A declared `Content-Length` over the limit is refused before anything is read. A body
    without one (chunked transfer) is read here up to the limit and handed on from memory;
    the route would read all of it anyway to parse the JSON.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Answer 413 for an oversized body; otherwise pass the request on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.max_body_bytes:
                await self._refuse(int(declared), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages, size = await self._read_body(receive)
        if size > self.max_body_bytes:
            await self._refuse(size, scope, receive, send)
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read_body(self, receive: Any) -> tuple[list[dict], int]:
        messages: list[dict] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, size
            size += len(message.get("body", b""))
            if size > self.max_body_bytes or not message.get("more_body", False):
                return messages, size

    async def _refuse(self, size: int, scope: dict, receive: Any, send: Any) -> None:
        too_long = TextTooLong(
            f"request body of {size} bytes or more is over the limit of "
            f"{self.max_body_bytes} bytes",
            {"body_bytes": size, "max_body_bytes": self.max_body_bytes},
        )
        await error_response(too_long)(scope, receive, send)


def _replay(messages: list[dict], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class HostCheck:
    """While API keys are off, refuse requests addressed to host names not allowed.

    Against DNS rebinding (`auth.is_allowed_host`): HTTP gets 403 `host_not_allowed`, a
    WebSocket upgrade is closed with 1008 before it is accepted. With keys on, a rebound
    page has no key to send, so every host passes.
    """

    def __init__(self, app: Any, guard: Guard, allowed_hosts: list[str]) -> None:
        self.app = app
        self.guard = guard
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on, or refuse it."""
        if scope["type"] not in ("http", "websocket") or self.guard.is_enabled:
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if is_allowed_host(host, self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "host_not_allowed"})
            return
        refused = HostNotAllowed(
            f"requests to host {host!r} are not served while API keys are off (DNS "
            "rebinding); open lens-serve by IP address or localhost, or list the name in "
            "allowed_hosts",
            {"host": host},
        )
        await error_response(refused)(scope, receive, send)


class SecurityHeaders:
    """Headers on every answer: no MIME sniffing, no framing by other sites, no referrer."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    )

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on; add the headers to its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in self.HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Allow browser calls from the configured origins only (none by default)."""
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )
