"""Browser tests of the web page: Playwright driving Debian's Chromium against real Serve.

Reuses the Serve fixtures of tests/deployments (group files over the demo, polling). The Ray
session is shared with tests/deployments when both run in one pytest session; alone, these
tests start their own. No browser is downloaded: Chromium comes from `apt-get install
chromium` (`.ci/run`), or `$LENS_SERVE_CHROMIUM`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deployments.conftest import (  # noqa: F401  (fixtures, registered by import)
    RayCluster,
    free_port,
    wait_until,
    write_groups,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ENV = "LENS_SERVE_CHROMIUM"
SCREENSHOTS_ENV = "LENS_SERVE_SCREENSHOTS"


def chromium_path() -> str | None:
    """Debian's Chromium (or `$LENS_SERVE_CHROMIUM`); None when there is none."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """Launch the system Chromium headless; `playwright install` is never needed."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium: `apt-get install chromium` (as .ci/run does)")
    args = list(browser_type_launch_args.get("args", []))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)
    return {**browser_type_launch_args, "executable_path": path, "args": args}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    """A desktop-sized window; downloads allowed (export tests read them)."""
    return {
        **browser_context_args,
        "viewport": {"width": 1400, "height": 1000},
        "accept_downloads": True,
    }


@pytest.fixture(scope="session", autouse=True)
def _expect_timeout() -> None:
    from playwright.sync_api import expect

    # Serve on two shared cores: a first lens load or a replica start can take seconds.
    expect.set_options(timeout=60_000)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """The session's Ray with Serve: the one tests/deployments started, or a new one."""
    import ray
    from ray import serve

    if ray.is_initialized():
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
        yield RayCluster(http_port=port, metrics_port=0)
        return
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    cluster = RayCluster(http_port=free_port(), metrics_port=free_port())
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port})
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def screenshots() -> Callable[[Any, str], Path]:
    """Return `shot(page, name)`: a full-page PNG under tests/frontend/screenshots/."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV, Path(__file__).parent / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)

    def shot(page: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return shot


def deploy(name: str, prefix: str, groups_dir: Path, base_url: str, **args: Any) -> None:
    """`serve.run` one application at `prefix` and wait until its router is ready."""
    from ray import serve

    from deployments.app import build_app
    from tests.deployments.conftest import wait_for

    serve.run(
        build_app({"groups_dir": str(groups_dir), **args}),
        name=name,
        route_prefix=prefix,
        blocking=False,
    )

    def is_ready() -> bool:
        try:
            return httpx.get(f"{base_url}{prefix}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(is_ready, timeout_s=300, what=f"{name} ready")
