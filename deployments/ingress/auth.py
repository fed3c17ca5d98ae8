"""API keys and rate limits: `require_api_key`, the dependency of every router but health.

Keys come from `config.api_keys_from_env` (env `LENS_SERVE_API_KEYS` or `api_keys_file`); an
empty set turns auth off. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from fastapi import WebSocketException, status
from starlette.requests import HTTPConnection

from deployments.ingress.errors import OriginNotAllowed, RateLimited, Unauthorized

# Identities kept by the rate limiter before idle ones are dropped (bounds its memory).
MAX_TRACKED_CLIENTS = 10_000
# Methods a cross-site page may send freely: they must not change anything.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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

    def __init__(
        self,
        api_keys: Iterable[str],
        rate_limit_per_minute: int | None,
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self._keys = [key.encode() for key in api_keys if key]
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None
        self.allowed_origins = {origin.rstrip("/") for origin in allowed_origins}

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


def is_allowed_origin(connection: HTTPConnection, guard: Guard) -> bool:
    """Tell whether a WebSocket upgrade or a state-changing request may come from its origin.

    Browsers send `Origin` on every WebSocket upgrade and, unlike `fetch`, apply no CORS
    check to it: any page a researcher opens could otherwise drive their local server
    (cross-site WebSocket hijacking). The same holds for a "simple" cross-site POST (a form,
    or `fetch` with `text/plain` or no body): the browser sends it without a preflight and
    only hides the answer, so `POST /reset` or a preload would still run. Allowed: no
    `Origin` (not a browser), the server's own origin (the page it serves), and the
    configured `cors_origins`.
    """
    origin = connection.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in guard.allowed_origins or "*" in guard.allowed_origins:
        return True
    host = connection.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower() and host != ""


def is_allowed_host(host_header: str | None, allowed_hosts: Iterable[str]) -> bool:
    """Tell whether a request addressed to `host_header` may reach a server without keys.

    DNS rebinding: a page of `evil.example` has its name re-pointed at 127.0.0.1, and the
    browser then treats the local server as that page's own origin (Origin and Host agree,
    CORS lets it read every answer). Its requests still name `evil.example` in `Host`, so
    only IP addresses, `localhost` (and `*.localhost`, which browsers keep on loopback) and
    the operator's `allowed_hosts` pass. No `Host` (HTTP/1.0, not a browser) passes too.
    """
    if not host_header:
        return True
    allowed = {host.lower() for host in allowed_hosts}
    if "*" in allowed:
        return True
    if any(c in host_header for c in "@/\\?#"):
        return False  # not a host[:port] a browser would send
    try:
        name = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    if name == "localhost" or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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
    """FastAPI dependency on every router but health: Origin, API key and rate limit.

    A refused WebSocket upgrade is closed with 1008 (policy violation) before it is accepted;
    a refused HTTP request that changes state answers 403 `origin_not_allowed`.
    """
    guard: Guard = connection.app.state.guard
    if connection.scope.get("type") != "websocket":
        if connection.scope.get("method") not in SAFE_METHODS and not is_allowed_origin(
            connection, guard
        ):
            raise OriginNotAllowed(
                f"requests that change state are not accepted from pages of "
                f"{connection.headers.get('origin')}; list it in cors_origins to allow it",
                {"origin": connection.headers.get("origin")},
            )
        check_access(connection, guard)
        return
    if not is_allowed_origin(connection, guard):
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, "origin_not_allowed")
    try:
        check_access(connection, guard)
    except (Unauthorized, RateLimited) as exc:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, exc.code) from exc
