"""Fixtures for the Ray Serve tests: one real Ray per session and group files over the demo."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    """The session's Ray: Serve's HTTP proxy port and Ray's metrics export port."""

    http_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """`ray.init(num_cpus=8)` once per session, Serve on a free port; all shut down after."""
    import ray
    from ray import serve

    # Ray workers inherit the environment: let them import `deployments` and `lenscore`.
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    cluster = RayCluster(http_port=free_port(), metrics_port=free_port())
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _metrics_export_port=cluster.metrics_port,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port})
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()


GroupOverrides = dict[str, Any]


@pytest.fixture(scope="session")
def write_groups(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Return `write(groups=("qwen2-tiny",), replica={...}, extra_lenses={...}) -> groups_dir`.

    Writes one group file per demo base into a fresh temporary directory, every path
    absolute into `demo_dir`, with small caches and `num_cpus: 0.01`, `num_gpus: 0`, one
    replica. `replica` overrides the replica block; `extra_lenses[group_id]` appends lens
    entries (dicts in group-file form, e.g. a second id on the same checkpoint).
    """
    manifest = json.loads((demo_dir / "manifest.json").read_text())

    def write(
        groups: tuple[str, ...] = ("qwen2-tiny",),
        *,
        replica: GroupOverrides | None = None,
        extra_lenses: dict[str, list[dict[str, Any]]] | None = None,
    ) -> Path:
        out = tmp_path_factory.mktemp("groups")
        for group_id in groups:
            data = demo_group(demo_dir, manifest, group_id, replica or {})
            data["lenses"] += (extra_lenses or {}).get(group_id, [])
            (out / f"{group_id}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return out

    return write


def demo_group(
    demo_dir: Path, manifest: dict[str, Any], group_id: str, replica: GroupOverrides
) -> dict[str, Any]:
    """A group file (as a dict) for one demo base, paths absolute."""
    lenses = [
        {
            "id": lens_id,
            "name": lens_id,
            "checkpoint": str(demo_dir / entry["checkpoint"]),
            "layer": entry["layer"],
            "donor": entry["donor"],
        }
        for lens_id, entry in manifest["lenses"].items()
        if entry["base"] == group_id
    ]
    donor_ids = {lens["donor"] for lens in lenses if lens["donor"]}
    return {
        "group_id": group_id,
        "name": group_id,
        "description": f"demo {group_id}",
        "base_model": str(demo_dir / manifest["bases"][group_id]),
        "dtype": "float32",
        "replica": {
            "max_lenses_per_replica": 2,
            "host_cache_gb": 0.01,
            "max_donors_per_replica": 1,
            "num_gpus": 0,
            "num_cpus": 0.01,
            "max_ongoing_requests": 32,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            **replica,
        },
        "donors": [
            {"id": donor_id, "path": str(demo_dir / manifest["donors"][donor_id])}
            for donor_id in sorted(donor_ids)
        ],
        "lenses": lenses,
    }


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., Any]:
    """Return `wait_for`: poll a predicate against a deadline (never a fixed sleep)."""
    return wait_for


def wait_for(predicate: Callable[[], Any], *, timeout_s: float = 120, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


# Rows of one request that shared a batched pass with others equal its lone run in every id
# and string; floats only to float32 rounding (docs/LENS_FORMAT.md, "Sampling and seeds").
ROW_FLOAT_TOLERANCE = 1e-5


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Assert two analyses agree: ids and strings exactly, floats within float32 rounding."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b), (a["position"], set(a) ^ set(b))
        for key, value in b.items():
            assert _close(a[key], value), (a["position"], key, a[key], value)


def _close(a: Any, b: Any) -> bool:
    if isinstance(b, float) and isinstance(a, float):
        return abs(a - b) <= ROW_FLOAT_TOLERANCE * max(1.0, abs(b))
    if isinstance(b, list) and isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, dict) and isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in b)
    return a == b
