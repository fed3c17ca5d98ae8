"""Fixtures of the client tests: a real lens-serve app under Serve, reused Ray session.

Reuses the Serve fixtures of tests/deployments (group files over the demo, polling). The Ray
session is shared with tests/deployments when both run in one pytest session; alone, these
tests start their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments.conftest import (  # noqa: F401  (fixtures, registered by import)
    RayCluster,
    free_port,
    wait_until,
    write_groups,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """The session's Ray with Serve: the one another test package started, or a new one.

    Module-scoped: a Ray started here stops after this module, so a later package can start
    its own.
    """
    import ray
    from ray import serve

    if ray.is_initialized():
        # NOTE: Serve has no public getter for its HTTP port; tests/frontend reads it alike.
        from ray.serve.context import _get_global_client

        yield RayCluster(http_port=_get_global_client().http_config.port, metrics_port=0)
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
