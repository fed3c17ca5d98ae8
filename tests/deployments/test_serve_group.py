"""The group deployment on a real Ray Serve: tiers, donors, single-flight, failures, reconfigure.

One application for the whole module, deployed the way serve_config.yaml deploys it (import
path + args), so a changed `user_config` reaches the running replica through `reconfigure`.
Tests run in file order and share the replica: each checks deltas of the status counters.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deployments.conftest import assert_same_rows

APP = "replica-test"
GROUP = "qwen2-tiny"
ROUTE = "/replica-test"
TEXT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"temperature": 0.0, "seed": 0}
CYCLE = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single", "qwen2-tiny-l1-donor"]
DONOR_TWIN = "qwen2-tiny-l1-donor-b"  # same checkpoint as qwen2-tiny-l1-donor, another id
COLD_TWIN = "qwen2-tiny-l2-first2-cold"  # same checkpoint, never requested before its test
CORRUPT = "qwen2-tiny-corrupt"  # an intact copy at start-up, truncated by its test


def app_config(groups_dir: Path, user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": APP,
        "route_prefix": ROUTE,
        "import_path": "deployments.app:build_app",
        "args": {"groups_dir": str(groups_dir)},
    }
    if user_config is not None:
        app["deployments"] = [{"name": GROUP, "user_config": user_config}]
    return {"applications": [app]}


def deploy(config: dict[str, Any]) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # What `serve deploy serve_config.yaml` sends: the controller builds the app from its
    # import path, so a config that changes only `user_config` updates replicas in place.
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def is_running() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app is not None and app.status == "RUNNING"


@pytest.fixture(scope="module")
def served(ray_cluster, write_groups, demo_dir, tmp_path_factory, wait_until):
    from ray import serve

    corrupt_dir = tmp_path_factory.mktemp("corrupt-run")
    newest = max((demo_dir / "lenses/qwen2-tiny-l0-single").glob("checkpoint_step*.pt"))
    shutil.copy(newest, corrupt_dir / newest.name)
    demo = demo_dir / "lenses"
    extra = [
        {"id": DONOR_TWIN, "name": "twin", "checkpoint": str(demo / "qwen2-tiny-l1-donor"),
         "layer": 1, "donor": "qwen2-tiny-donor"},
        {"id": COLD_TWIN, "name": "cold", "checkpoint": str(demo / "qwen2-tiny-l2-first2"),
         "layer": 2},
        {"id": CORRUPT, "name": "bad", "checkpoint": str(corrupt_dir), "layer": 0},
    ]  # fmt: skip
    groups_dir = write_groups((GROUP,), extra_lenses={GROUP: extra})
    deploy(app_config(groups_dir))
    wait_until(is_running, timeout_s=300, what=f"app {APP} running")
    handle = serve.get_deployment_handle(GROUP, app_name=APP)
    yield {"handle": handle, "groups_dir": groups_dir, "corrupt_file": corrupt_dir / newest.name}
    serve.delete(APP)


def call(handle, lens_id: str, method: str, *args: Any) -> Any:
    bound = handle.options(multiplexed_model_id=lens_id)
    return getattr(bound, method).remote(*args).result(timeout_s=120)


def status(handle) -> dict[str, Any]:
    return handle.status.remote().result(timeout_s=60).model_dump()


def analyze_body() -> dict[str, Any]:
    return {"text": TEXT, "options": dict(GREEDY)}


def direct_analyze(group_dir: Path, lens_id: str) -> dict[str, Any]:
    from deployments.group_files import load_groups
    from lenscore import AnalysisOptions, analyze, load_base, load_lens

    group = load_groups(group_dir)[0]
    spec = group.lens(lens_id)
    base = load_base(group.base_model, dtype=group.dtype)
    donor = load_base(group.donor(spec.donor).path, dtype=group.dtype) if spec.donor else None
    lens = load_lens(spec.checkpoint, base, donor=donor, lens_id=lens_id)
    options = AnalysisOptions(**GREEDY, batch_size=spec.batch_size)
    return analyze(lens, text=TEXT, options=options)


def expected_switch(replica: dict[str, Any], lens_id: str) -> str:
    """The switch kind a request for `lens_id` must report, from the replica's status."""
    if lens_id in replica["lenses"]["device"]:
        return "hit"
    if lens_id in replica["lenses"]["host"]:
        return "host"
    return "disk" if any(replica["loads"].values()) else "first"


def test_served_analysis_equals_direct_lenscore_at_temperature_zero(served):
    for lens_id in ("qwen2-tiny-l1", "qwen2-tiny-l1-donor"):
        expected_kind = expected_switch(status(served["handle"]), lens_id)
        served_result = call(served["handle"], lens_id, "analyze", analyze_body())
        direct = direct_analyze(served["groups_dir"], lens_id)
        assert served_result["rows"] == direct["rows"], lens_id
        meta = served_result["meta"]
        assert meta["lens_id"] == lens_id and meta["group_id"] == GROUP
        assert meta["switch"]["kind"] == expected_kind, (lens_id, meta["switch"])
        assert meta["replica_id"]


def test_http_analysis_through_the_ingress_equals_direct(served, ray_cluster):
    url = f"{ray_cluster.http_url}{ROUTE}/api/v2/lenses/qwen2-tiny-l1/analyze"
    response = httpx.post(url, json=analyze_body(), timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == direct_analyze(served["groups_dir"], "qwen2-tiny-l1")["rows"]


def test_streamed_analysis_yields_progress_then_meta_rows_and_done(served):
    bound = served["handle"].options(multiplexed_model_id="qwen2-tiny-l1", stream=True)
    events = list(bound.analyze_stream.remote(analyze_body()))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "progress" and kinds[-1] == "done", kinds
    meta_at = kinds.index("meta")
    rows = [e["row"] for e in events if e["event"] == "row"]
    assert kinds[meta_at + 1 : -1] == ["row"] * len(rows)
    assert rows == call(served["handle"], "qwen2-tiny-l1", "analyze", analyze_body())["rows"]
    assert events[meta_at]["meta"]["group_id"] == GROUP


def test_cycling_four_lenses_evicts_to_host_and_hits_the_host_tier(served):
    handle = served["handle"]
    before = status(handle)
    for lens_id in CYCLE * 2:
        call(handle, lens_id, "ensure_lens")
    after = status(handle)
    assert after["base_loads"] == 1
    assert len(after["lenses"]["device"]) == 2
    assert after["lenses"]["device"] == CYCLE[2:]  # most recent last
    assert set(CYCLE[:2]) <= set(after["lenses"]["host"])
    # The second round finds every lens in the host tier (LRU of 2 over 4 lenses).
    assert after["switches"]["host"] - before["switches"]["host"] >= 4
    assert after["memory"]["lens_bytes"] > 0 and after["memory"]["base_bytes"] > 0


def test_donor_loads_once_and_is_shared_by_two_lenses(served):
    handle = served["handle"]
    for lens_id in ("qwen2-tiny-l1-donor", DONOR_TWIN, "qwen2-tiny-l1-donor", DONOR_TWIN):
        result = call(handle, lens_id, "analyze", analyze_body())
        assert result["meta"]["donor"], result["meta"]
    after = status(handle)
    assert after["donor_loads"] == 1
    assert len(after["donors"]) == 1
    assert after["loads"][DONOR_TWIN] >= 1


def test_concurrent_requests_for_a_cold_lens_load_it_once(served):
    handle = served["handle"]
    assert COLD_TWIN not in status(handle)["loads"]
    bound = handle.options(multiplexed_model_id=COLD_TWIN)
    responses = [bound.analyze.remote(analyze_body()) for _ in range(12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: r.result(timeout_s=120), responses))
    for result in results[1:]:  # several of them shared batched passes
        assert_same_rows(result["rows"], results[0]["rows"])
    assert status(handle)["loads"][COLD_TWIN] == 1


def test_corrupt_checkpoint_fails_only_its_own_lens(served):
    from lenscore import LensError

    handle = served["handle"]
    path = served["corrupt_file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    for _ in range(2):  # the second one is answered from the back-off, without a read
        with pytest.raises(LensError) as caught:
            call(handle, CORRUPT, "analyze", analyze_body())
        assert caught.value.code == "corrupt_checkpoint", caught.value
    after = status(handle)
    assert CORRUPT in after["lenses"]["failed"]
    assert "corrupt checkpoint" in after["lenses"]["failed"][CORRUPT]
    assert call(handle, "qwen2-tiny-l1", "analyze", analyze_body())["rows"]
    assert status(handle)["base_loads"] == 1


def test_registry_reports_every_running_replica(served, wait_until):
    import ray

    from deployments.replica.registry import get_registry

    replica_id = status(served["handle"])["replica_id"]

    def reported() -> list[dict[str, Any]]:
        found = ray.get(get_registry().all_status.remote(APP), timeout=30).get(GROUP, [])
        return [s.model_dump() for s in found if s.replica_id == replica_id]

    (snapshot,) = wait_until(reported, timeout_s=60, what="registry snapshot")
    assert snapshot["group_id"] == GROUP
    assert set(snapshot["switches"]) == {"hit", "host", "prefetch", "disk", "first"}


def test_reconfigure_changes_the_cache_size_live(served, wait_until):
    handle = served["handle"]
    before = status(handle)
    deploy(app_config(served["groups_dir"], {"max_lenses_per_replica": 3}))

    def reconfigured() -> dict[str, Any] | None:
        now = status(handle)
        return now if now["max_lenses_per_replica"] == 3 else None

    wait_until(reconfigured, timeout_s=120, what="max_lenses_per_replica 3")
    for lens_id in CYCLE[:3]:
        call(handle, lens_id, "ensure_lens")
    after = status(handle)
    assert after["replica_id"] == before["replica_id"]  # same replica: no restart
    assert after["base_loads"] == 1
    assert len(after["lenses"]["device"]) == 3

    deploy(app_config(served["groups_dir"], {"max_lenses_per_replica": 1}))
    shrunk = wait_until(
        lambda: (s := status(handle))["max_lenses_per_replica"] == 1 and s,
        timeout_s=120,
        what="max_lenses_per_replica 1",
    )
    assert len(shrunk["lenses"]["device"]) == 1  # the extra lenses went to the host tier
    assert shrunk["replica_id"] == before["replica_id"]


def scrape_switch_counts(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ray_lens_switch_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_count") and labels.get("application") == APP:
                assert {"group", "kind", "deployment", "replica"} <= set(labels), labels
                counts[labels["kind"]] = counts.get(labels["kind"], 0) + sample.value
    return counts


def test_switch_metrics_are_exported_with_the_status_counts(served, ray_cluster, wait_until):
    handle = served["handle"]
    call(handle, "qwen2-tiny-l1", "ensure_lens")
    call(handle, "qwen2-tiny-l1", "ensure_lens")  # a hit
    expected = {k: float(v) for k, v in status(handle)["switches"].items() if v}

    def exported() -> dict[str, float] | None:
        counts = scrape_switch_counts(ray_cluster.metrics_port)
        return counts if counts == expected else None

    wait_until(exported, timeout_s=90, what=f"exported switch counts {expected}")
