"""API keys, rate limits and request-size limits of the router (issue 5, STYLE §2).

Keys come from `config.api_keys_from_env` (env `LENS_SERVE_API_KEYS` or `api_keys_file`); an
empty set turns auth off. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, WebSocketException, status
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

from deployments.errors import RateLimited, Unauthorized, error_response
from lenscore import TextTooLong

# Room in a body beyond its text: JSON escapes (up to 6 bytes a character, 8 allowed), options
# and up to 100_000 explicit positions.
BODY_BYTES_PER_TEXT_CHAR = 8
BODY_OVERHEAD_BYTES = 1 << 20
# Identities kept by the rate limiter before idle ones are dropped (bounds its memory).
MAX_TRACKED_CLIENTS = 10_000


class RateLimiter:
    """A token bucket per client: `per_minute` requests a minute, bursts up to `per_minute`."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at_seconds)

    def acquire(self, identity: str) -> float | None:
        """Take one token; return None if allowed, else the seconds until one is free."""
        now = self.clock()
        rate_per_second = self.per_minute / 60.0
        tokens, at = self._buckets.get(identity, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * rate_per_second)
        if tokens < 1.0:
            self._buckets[identity] = (tokens, now)
            return (1.0 - tokens) / rate_per_second
        self._buckets[identity] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._forget_idle(now)
        return None

    def _forget_idle(self, now: float) -> None:
        # A client idle for a minute has a full bucket again: forgetting it changes nothing.
        for identity, (_, at) in list(self._buckets.items()):
            if now - at >= 60.0:
                del self._buckets[identity]


class Guard:
    """What `require_api_key` checks: the key set and the optional rate limiter."""

    def __init__(self, api_keys: Iterable[str], rate_limit_per_minute: int | None) -> None:
        self._keys = [key.encode() for key in api_keys if key]
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None

    @property
    def is_enabled(self) -> bool:
        """True when requests must carry a key."""
        return bool(self._keys)

    def is_valid_key(self, presented: str) -> bool:
        """Constant-time check of a presented key against every configured key."""
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            # No early exit: the time taken does not tell which key (or how much) matched.
            matched |= secrets.compare_digest(candidate, key)
        return matched


def presented_key(connection: HTTPConnection) -> str | None:
    """Return the bearer token, or on a WebSocket upgrade also `?api_key=`.

    Browsers cannot set headers on a WebSocket, hence the query parameter there only.
    """
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if connection.scope.get("type") == "websocket":
        return connection.query_params.get("api_key")
    return None


def client_identity(connection: HTTPConnection, key: str | None) -> str:
    """Rate-limit identity: a digest of the key (never the key), else the client address."""
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    host = connection.client.host if connection.client else "unknown"
    return "addr:" + host


def check_access(connection: HTTPConnection, guard: Guard) -> None:
    """Raise `Unauthorized` or `RateLimited` unless the connection may proceed."""
    key = presented_key(connection)
    if guard.is_enabled and (key is None or not guard.is_valid_key(key)):
        raise Unauthorized(
            "missing or wrong API key; send `Authorization: Bearer <key>`",
            {"scheme": "bearer"},
        )
    if guard.limiter is not None:
        wait_seconds = guard.limiter.acquire(client_identity(connection, key))
        if wait_seconds is not None:
            raise RateLimited(
                f"rate limit of {guard.limiter.per_minute} requests per minute reached",
                {"retry_after_seconds": round(wait_seconds, 3)},
                retry_after_s=wait_seconds,
            )


async def require_api_key(connection: HTTPConnection) -> None:
    """FastAPI dependency on every router but health: API key and rate limit.

    A refused WebSocket upgrade is closed with 1008 (policy violation) before it is accepted.
    """
    guard: Guard = connection.app.state.guard
    if connection.scope.get("type") != "websocket":
        check_access(connection, guard)
        return
    try:
        check_access(connection, guard)
    except (Unauthorized, RateLimited) as exc:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, exc.code) from exc


def check_text_length(length: int, max_text_length: int) -> None:
    """Raise `TextTooLong` (413) when a request's text exceeds `max_text_length` characters."""
    if length > max_text_length:
        raise TextTooLong(
            f"text of {length} characters is longer than the limit of {max_text_length}",
            {"length": length, "max_text_length": max_text_length},
        )


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Allow browser calls from the configured origins only (none by default)."""
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )


def max_body_bytes(max_text_length: int) -> int:
    """Largest request body accepted for a `max_text_length` (characters) limit."""
    return BODY_BYTES_PER_TEXT_CHAR * max_text_length + BODY_OVERHEAD_BYTES


class BodySizeLimit:
    """Refuse a body whose `Content-Length` exceeds the limit with 413, before it is read.

    Bodies without a length (chunked) are read as usual; `check_text_length` still applies.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Answer 413 for an oversized declared body; otherwise pass the request on."""
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                too_long = TextTooLong(
                    f"request body of {int(declared)} bytes is over the limit of "
                    f"{self.max_body_bytes} bytes",
                    {"body_bytes": int(declared), "max_body_bytes": self.max_body_bytes},
                )
                await error_response(too_long)(scope, receive, send)
                return
        await self.app(scope, receive, send)
