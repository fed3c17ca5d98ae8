"""The router: `Ingress` builds the FastAPI app and sends each request to its group's replicas.

Data path: HTTP -> here -> group replica (`GroupServer`) via a `DeploymentHandle` per lens id
(`multiplexed_model_id=lens_id`, so Serve prefers replicas already holding the lens).
`app.py` deploys it with `serve.deployment(build_ingress_deployment_class(), name="Ingress")`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import ProcessCollector as PromProcessCollector
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.auth import BodySizeLimit, Guard, add_cors, max_body_bytes
from deployments.config import AppArgs, GroupSpec, api_keys_from_env
from deployments.errors import UnknownGroup, UnknownLens, install_error_handlers, translate
from deployments.metrics import SWITCH_BUCKETS_SECONDS, IngressMetrics
from deployments.sizes import GroupSizes, measure_group

logger = logging.getLogger("ray.serve")

# How long a registry snapshot is reused for cold-start detection and the groups list.
SNAPSHOT_TTL_SECONDS = 1.0
# Registry calls must not hang a request when the registry actor is gone.
REGISTRY_TIMEOUT_SECONDS = 5.0
# Cold-start waits kept per group for the measured estimate.
COLD_HISTORY = 32


class RouterMetrics:
    """Metrics of the router process: Ray-exported ones, and `GET /metrics`'s own registry."""

    def __init__(self) -> None:
        self.ray = IngressMetrics()
        # A registry per app rather than prometheus_client's global one (no module state).
        self.registry = CollectorRegistry()
        PromProcessCollector(registry=self.registry)
        self.requests = Counter(
            "lens_router_requests",
            "Requests the router answered, by route and HTTP status.",
            ("endpoint", "status"),
            registry=self.registry,
        )
        self.cold_start_seconds = Histogram(
            "lens_cold_start_seconds",
            "Wait for a group that had no running replica (the cross-group switch).",
            ("group",),
            buckets=SWITCH_BUCKETS_SECONDS,
            registry=self.registry,
        )

    def record_request(self, group_id: str, endpoint: str, status: int) -> None:
        """Count one answered request in both exports."""
        self.ray.record_request(group_id, endpoint, status)
        self.requests.labels(endpoint, str(status)).inc()

    def record_cold_start(self, group_id: str, seconds: float) -> None:
        """Record one wait for a group with no running replica."""
        self.ray.record_cold_start(group_id, seconds)
        self.cold_start_seconds.labels(group_id).observe(seconds)


class IngressState:
    """Everything the routes share (`app.state.ingress`): ids, handles, sizes, snapshots."""

    def __init__(
        self,
        args: AppArgs,
        groups: list[GroupSpec],
        handles: dict[str, DeploymentHandle],
        metrics: RouterMetrics,
    ) -> None:
        self.args = args
        self.groups = {group.group_id: group for group in groups}
        self.group_of_lens = {lens.lens_id: group for group in groups for lens in group.lenses}
        self.metrics = metrics
        self.sizes: dict[str, GroupSizes] = {}
        self.cold_seconds: dict[str, deque[float]] = {
            g: deque(maxlen=COLD_HISTORY) for g in self.groups
        }
        self.is_ready = False
        self._handles = handles
        self._lens_handles: dict[tuple[str, bool], DeploymentHandle] = {}
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._snapshots_at = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._registry: Any = None
        self.has_snapshot = False  # False until the registry answers (and after it fails)

    async def start(self) -> None:
        """Measure base, donor and lens sizes once (reads checkpoint headers, off the loop)."""
        for group_id, group in self.groups.items():
            self.sizes[group_id] = await asyncio.to_thread(measure_group, group)
        self.is_ready = True

    # --- ids -------------------------------------------------------------------------------

    def group(self, group_id: str) -> GroupSpec:
        """Return the group with this id; raise `UnknownGroup` (404) otherwise."""
        try:
            return self.groups[group_id]
        except KeyError:
            raise UnknownGroup(group_id) from None

    def group_for_lens(self, lens_id: str) -> GroupSpec:
        """Return the group serving this lens; raise `UnknownLens` (404) otherwise."""
        try:
            return self.group_of_lens[lens_id]
        except KeyError:
            raise UnknownLens(lens_id) from None

    def lens_handle(self, lens_id: str, *, stream: bool = False) -> DeploymentHandle:
        """One configured handle per lens id (each `.options()` call builds a new handle)."""
        key = (lens_id, stream)
        handle = self._lens_handles.get(key)
        if handle is None:
            group = self.group_for_lens(lens_id)
            handle = self._handles[group.group_id].options(
                multiplexed_model_id=lens_id, stream=stream
            )
            self._lens_handles[key] = handle
        return handle

    # --- replica snapshots (deployments/registry.py) ----------------------------------------

    async def snapshots(self, *, fresh: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Return the status of every running replica by group id, from the registry actor.

        Reused for `SNAPSHOT_TTL_SECONDS` unless `fresh`; one refresh runs at a time and the
        callers waiting on it share its answer. An unreachable registry reads as the last
        snapshot (logged), so listing never fails because of it.
        """
        asked_at = time.monotonic()
        if not fresh and asked_at - self._snapshots_at <= SNAPSHOT_TTL_SECONDS:
            return self._snapshots
        async with self._refresh_lock:
            if self._snapshots_at >= asked_at:
                return self._snapshots  # refreshed while this caller waited
            started = time.monotonic()
            try:
                registry = self._get_registry()
                snapshot = await asyncio.wait_for(
                    registry.all_status.remote(), REGISTRY_TIMEOUT_SECONDS
                )
            except Exception:  # the registry is advisory here: log and keep the last one
                logger.warning(
                    "replica registry unreachable; using the last snapshot", exc_info=True
                )
                self._registry = None
                self.has_snapshot = False
                return self._snapshots
            self._snapshots = {g: list(snapshot.get(g, [])) for g in self.groups}
            self._snapshots_at = started
            self.has_snapshot = True
        return self._snapshots

    def _get_registry(self) -> Any:
        if self._registry is None:
            from deployments.registry import get_registry

            self._registry = get_registry()
        return self._registry

    async def group_replicas(self, group_id: str) -> list[dict[str, Any]]:
        """Every running replica of one group, fresh from the registry."""
        self.group(group_id)
        return (await self.snapshots(fresh=True)).get(group_id, [])

    # --- calls -----------------------------------------------------------------------------

    async def call(self, lens_id: str, method: str, *args: Any) -> Any:
        """Call a lens method of the group replica; errors come back as `LensError`s."""
        handle = self.lens_handle(lens_id)
        await self._wait_if_cold(lens_id)
        response = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(_await(response), self.args.request_timeout_s)
        except BaseException as exc:
            cancel_quietly(response)
            _reraise(exc)

    async def open_stream(
        self, lens_id: str, method: str, *args: Any
    ) -> tuple[Any, DeploymentResponseGenerator]:
        """Start a streaming call and wait for its first item, so errors keep their status."""
        handle = self.lens_handle(lens_id, stream=True)
        await self._wait_if_cold(lens_id)
        stream = getattr(handle, method).remote(*args)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.args.request_timeout_s)
        except StopAsyncIteration:
            return None, stream
        except BaseException as exc:
            cancel_quietly(stream)
            _reraise(exc)
        return first, stream

    async def _wait_if_cold(self, lens_id: str) -> None:
        """Measure `lens_cold_start_seconds`: a group with no running replica is waited for.

        The wait is timed as one `ensure_lens` call (replica start, base load, lens load), so
        the analysis that follows is not counted in it.
        """
        group_id = self.group_for_lens(lens_id).group_id
        if not await self._is_cold(group_id):
            return
        started = time.monotonic()
        response = self.lens_handle(lens_id).ensure_lens.remote()
        try:
            await asyncio.wait_for(_await(response), self.args.request_timeout_s)
        except BaseException as exc:
            cancel_quietly(response)
            _reraise(exc)
        seconds = time.monotonic() - started
        self.metrics.record_cold_start(group_id, seconds)
        self.cold_seconds[group_id].append(seconds)
        self._snapshots_at = float("-inf")  # the group has a replica now

    async def _is_cold(self, group_id: str) -> bool:
        # A cached "no replica" is confirmed with a fresh snapshot; without a registry
        # answer nothing counts as cold (no false cold starts while it is unreachable).
        if (await self.snapshots()).get(group_id) or not self.has_snapshot:
            return False
        replicas = (await self.snapshots(fresh=True)).get(group_id)
        return self.has_snapshot and not replicas


def cancel_quietly(response: DeploymentResponse | DeploymentResponseGenerator) -> None:
    """Cancel a handle call that may still run; a call that already ended is left alone.

    NOTE: `DeploymentResponse.cancel()` re-raises the call's own error (e.g. Serve's
    `BackPressureError`) when the call already failed; that error is reported elsewhere.
    """
    try:
        response.cancel()
    except Exception:  # the call had ended with an error the caller already handles
        logger.debug("cancel of a finished handle call raised", exc_info=True)


def _reraise(exc: BaseException) -> NoReturn:
    translated = translate(exc)
    if translated is exc:
        raise exc
    raise translated from exc


async def _await(awaitable: Any) -> Any:
    # `asyncio.wait_for` takes coroutines; a DeploymentResponse is only awaitable.
    return await awaitable


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


def build_fastapi_app(state: IngressState, guard: Guard) -> FastAPI:
    """Build the router's FastAPI app: routes, error handlers, CORS, request metrics."""
    from deployments.api import groups, health, lenses, metrics, ws

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Under Serve this runs once per ingress replica; a failure fails the replica.
        app.state.ingress = state
        app.state.guard = guard
        await state.start()
        yield

    app = FastAPI(
        title="lens-serve",
        version="2",
        description="Natural-language-autoencoder lenses over shared base models.",
        lifespan=lifespan,
    )
    app.state.ingress = state
    app.state.guard = guard
    install_error_handlers(app)
    for module in (health, groups, lenses, ws, metrics):
        app.include_router(module.router)
    # The page's scripts and styles: static files only, no data, so no key (like `/`).
    app.mount("/static", StaticFiles(directory=frontend_path().parent), name="static")
    # Starlette runs the last added middleware first: metrics, then CORS, then the size limit.
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes(state.args.max_text_length))
    add_cors(app, state.args.cors_origins)
    app.add_middleware(RequestMetricsMiddleware, state=state)
    return app


class Ingress:
    """The router deployment's class (deployment name `Ingress`).

    A plain class: `app.py` wraps `build_ingress_deployment_class()` with `serve.deployment`
    and binds it with `(args, groups, handles)`, `handles` mapping group id to the group
    deployment's handle. Serve calls `__serve_build_asgi_app__` after `__init__` to get the
    FastAPI app, so the app is built inside the replica from these arguments.
    """

    def __init__(
        self, args: AppArgs, groups: list[GroupSpec], handles: dict[str, DeploymentHandle]
    ) -> None:
        self.args = args
        self.groups = groups
        self.handles = handles
        self.metrics = RouterMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Build the app from the constructor's arguments (Serve's late-bound ASGI hook)."""
        guard = Guard(api_keys_from_env(self.args), self.args.rate_limit_per_minute)
        state = IngressState(self.args, self.groups, self.handles, self.metrics)
        return build_fastapi_app(state, guard)


def build_ingress_deployment_class() -> type:
    """`Ingress` wrapped as a Serve FastAPI ingress; `app.py` passes it to `serve.deployment`.

    `serve.ingress()` without an app defers the app to replica start, where Serve calls
    `Ingress.__serve_build_asgi_app__` (Ray Serve 2.60's late-bound ingress).
    """
    return serve.ingress()(Ingress)


def frontend_path() -> Path:
    """Return the path of the static page served at `/`."""
    return Path(__file__).resolve().parents[1] / "frontend" / "index.html"
