"""The ingress deployment: `Ingress` builds the FastAPI app that routes each request.

Top of the data path: HTTP -> middleware (metrics, CORS, body limit) -> a route in
`routes/` -> `IngressState.call` -> the group's `DeploymentHandle` with the lens id as
Serve's multiplexed model id (so Serve prefers replicas already holding the lens).
`app.py` deploys it with `serve.deployment(build_ingress_deployment_class(), name="Ingress")`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.checks import StartupReport
from deployments.config import AppArgs, GroupSpec, api_keys_from_env
from deployments.ingress.auth import Guard
from deployments.ingress.errors import install_error_handlers
from deployments.ingress.group_watch import GroupWatch
from deployments.ingress.jobs import JobRunner
from deployments.ingress.legacy import routers as legacy_routers
from deployments.ingress.middleware import (
    BodySizeLimit,
    HostCheck,
    RequestMetricsMiddleware,
    SecurityHeaders,
    add_cors,
    max_body_bytes,
)
from deployments.ingress.routes import docs, groups, health, lenses, metrics, ws
from deployments.ingress.routes import jobs as job_routes
from deployments.ingress.state import IngressState
from deployments.ops.metrics import RouterMetrics


def build_fastapi_app(state: IngressState, guard: Guard) -> FastAPI:
    """Build the ingress's FastAPI app: routes, error handlers, middleware, static files."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Under Serve this runs once per ingress replica; a failure fails the replica.
        app.state.ingress = state
        app.state.guard = guard
        await state.start()
        watch = GroupWatch(state)
        watch.start(state.args.group_reload_s)
        yield
        watch.stop()
        await app.state.jobs.close()

    public_docs = state.args.public_docs
    if public_docs is None:
        public_docs = not guard.is_enabled
    app = FastAPI(
        title="lens-serve",
        version="2",
        description="Natural-language-autoencoder lenses over shared base models.",
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.state.ingress = state
    app.state.guard = guard
    app.state.jobs = JobRunner(state)  # durable jobs run here, kept in the job store
    install_error_handlers(app)
    for module in (health, groups, lenses, ws, metrics):
        app.include_router(module.router)
    app.include_router(job_routes.router)
    for router in legacy_routers:  # the old backend's clients (README §Migrating)
        app.include_router(router)
    if not public_docs:
        app.include_router(docs.keyed_docs_router(app))
    # The page's scripts and styles: static files only, no data, so no key (like `/`).
    app.mount("/static", StaticFiles(directory=health.FRONTEND_DIR), name="static")
    # Starlette runs the last added middleware first: metrics, security headers, the host
    # check, CORS, then the size limit.
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes(state.args.max_text_length))
    add_cors(app, state.args.cors_origins)
    app.add_middleware(HostCheck, guard=guard, allowed_hosts=state.args.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetricsMiddleware, state=state)
    return app


class Ingress:
    """The ingress deployment's class (deployment name `Ingress`).

    A plain class: `app.py` wraps `build_ingress_deployment_class()` with `serve.deployment`
    and binds it with `(args, groups, handles, report)`: `handles` maps group id to the group
    deployment's handle (groups whose base failed its check have none), `report` says what
    failed its start-up check. Serve calls `__serve_build_asgi_app__` after `__init__` to get the
    FastAPI app, so the app is built inside the replica from these arguments.
    """

    def __init__(
        self,
        args: AppArgs,
        groups: list[GroupSpec],
        handles: dict[str, DeploymentHandle],
        report: StartupReport,
    ) -> None:
        self.args = args
        self.groups = groups
        self.handles = handles
        self.report = report
        self.metrics = RouterMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Build the app from the constructor's arguments (Serve's late-bound ASGI hook)."""
        guard = Guard(
            api_keys_from_env(self.args),
            self.args.rate_limit_per_minute,
            allowed_origins=self.args.cors_origins,
        )
        state = IngressState(
            self.args, self.groups, self.handles, self.metrics, self.report, app_name=_app_name()
        )
        return build_fastapi_app(state, guard)


def build_ingress_deployment_class() -> type:
    """`Ingress` wrapped as a Serve FastAPI ingress; `app.py` passes it to `serve.deployment`.

    `serve.ingress()` without an app defers the app to replica start, where Serve calls
    `Ingress.__serve_build_asgi_app__` (Ray Serve 2.60's late-bound ingress).
    """
    return serve.ingress()(Ingress)


def _app_name() -> str:
    # The registry keys replica statuses by application: read only this app's groups.
    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return ""
