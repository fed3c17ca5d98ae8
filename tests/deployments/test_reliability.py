"""Reliability on a real Ray Serve, through its HTTP proxy (issue 5, "How we will check it").

One application for the module: the demo qwen2 group (plus lenses whose run directories are
temporary copies that the tests break after start-up) and a `qwen2-budget` group whose device
memory budget fits its base and its small lens but not its big one. Tests run in file order
and share the replicas; the last one kills the qwen2 replica.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deployments.conftest import assert_same_rows

APP = "reliability"
PREFIX = "/reliability"
GROUP = "qwen2-tiny"
BUDGET_GROUP = "qwen2-budget"
TEXT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"temperature": 0.0, "seed": 0}
GOOD = "qwen2-tiny-l1"
COLD = "reliability-cold"  # the checkpoint of qwen2-tiny-l2-first2, first asked for by 50 at once
INCOMPATIBLE = "reliability-incompatible"  # gets a newer step with layer_l 7 after start-up
FALLBACK = "reliability-fallback"  # its newest step is truncated after start-up
OLDER = "reliability-older"  # the older step of FALLBACK's run directory, as one file
MISSING = "reliability-missing"  # its run directory is moved away after start-up, then back
STORM = ["reliability-storm-a", "reliability-storm-b"]  # cold twins, preloaded by many at once
BUDGET_SMALL = "budget-small"  # qwen2-tiny-l0-single: fits the budget beside the base
BUDGET_BIG = "budget-big"  # qwen2-tiny-l1: does not
CONCURRENT_COLD_REQUESTS = 50
GIB = 1024**3


def deploy(groups_dir: Path) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # What `serve deploy serve_config.yaml` sends; its Ingress override matters here: with
    # Serve's default of 5 ongoing requests the router would let only 5 of the 50
    # concurrent first requests through at a time.
    config = {
        "applications": [
            {
                "name": APP,
                "route_prefix": PREFIX,
                "import_path": "deployments.app:build_app",
                "args": {"groups_dir": str(groups_dir)},
                "deployments": [{"name": "Ingress", "max_ongoing_requests": 200}],
            }
        ]
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def copy_run_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.glob("checkpoint_step*.pt"):
        shutil.copy(path, target / path.name)
    return target


def budget_group(groups_dir: Path, demo_dir: Path, manifest: dict[str, Any]) -> None:
    """Write `qwen2-budget.yaml`: budget = base + halfway between its small and big lens."""
    from lenscore import load_base, read_checkpoint

    lenses = manifest["lenses"]
    small = read_checkpoint(demo_dir / lenses["qwen2-tiny-l0-single"]["checkpoint"])
    big = read_checkpoint(demo_dir / lenses[GOOD]["checkpoint"])
    base_bytes = load_base(demo_dir / manifest["bases"][GROUP], dtype="float32").nbytes
    assert small.tensor_bytes < big.tensor_bytes
    budget_bytes = base_bytes + (small.tensor_bytes + big.tensor_bytes) // 2
    data = yaml.safe_load((groups_dir / f"{GROUP}.yaml").read_text())
    data["group_id"] = BUDGET_GROUP
    data["replica"]["device_memory_budget_gb"] = budget_bytes / GIB
    data["donors"] = []
    data["lenses"] = [
        {"id": BUDGET_SMALL, "name": BUDGET_SMALL, "layer": 0,
         "checkpoint": str(demo_dir / lenses["qwen2-tiny-l0-single"]["checkpoint"])},
        {"id": BUDGET_BIG, "name": BUDGET_BIG, "layer": 1,
         "checkpoint": str(demo_dir / lenses[GOOD]["checkpoint"])},
    ]  # fmt: skip
    (groups_dir / f"{BUDGET_GROUP}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def served(
    ray_cluster: Any,
    write_groups: Callable[..., Path],
    demo_dir: Path,
    demo_manifest: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    wait_until: Callable[..., Any],
) -> Iterator[dict[str, Any]]:
    from ray import serve

    runs = tmp_path_factory.mktemp("reliability-runs")
    demo = demo_dir / "lenses"
    incompatible_dir = copy_run_dir(demo / GOOD, runs / INCOMPATIBLE)
    fallback_dir = copy_run_dir(demo / GOOD, runs / FALLBACK)
    missing_dir = copy_run_dir(demo / GOOD, runs / MISSING)
    steps = sorted(fallback_dir.glob("checkpoint_step*.pt"), key=checkpoint_step)
    assert len(steps) >= 2, steps  # the demo's qwen2-tiny-l1 run has two steps
    extra = [
        {"id": COLD, "name": COLD, "checkpoint": str(demo / "qwen2-tiny-l2-first2"), "layer": 2},
        {"id": INCOMPATIBLE, "name": INCOMPATIBLE, "checkpoint": str(incompatible_dir),
         "layer": 1},
        {"id": FALLBACK, "name": FALLBACK, "checkpoint": str(fallback_dir), "layer": 1},
        {"id": OLDER, "name": OLDER, "checkpoint": str(steps[-2]), "layer": 1},
        {"id": MISSING, "name": MISSING, "checkpoint": str(missing_dir), "layer": 1},
        {"id": STORM[0], "name": STORM[0], "checkpoint": str(demo / "qwen2-tiny-l0-single"),
         "layer": 0},
        {"id": STORM[1], "name": STORM[1], "checkpoint": str(demo / "qwen2-tiny-l2-first2"),
         "layer": 2},
    ]  # fmt: skip
    groups_dir = write_groups((GROUP,), extra_lenses={GROUP: extra})
    budget_group(groups_dir, demo_dir, demo_manifest)
    deploy(groups_dir)
    base_url = ray_cluster.http_url + PREFIX
    with httpx.Client(base_url=base_url, timeout=120) as client:
        wait_until(lambda: is_ready(client), timeout_s=300, what=f"app {APP} ready")
        yield {
            "client": client,
            "base_url": base_url,
            "incompatible_dir": incompatible_dir,
            "newest_fallback": steps[-1],
            "missing_dir": missing_dir,
        }
    serve.delete(APP)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1].removeprefix("step"))


def is_ready(client: httpx.Client) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or app.status != "RUNNING":
        return False
    try:
        return client.get("/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def analyze_body(text: str = TEXT, **options: Any) -> dict[str, Any]:
    return {"text": text, "options": {**GREEDY, **options}}


def analyze(client: httpx.Client, lens_id: str, **options: Any) -> httpx.Response:
    return client.post(f"/api/v2/lenses/{lens_id}/analyze", json=analyze_body(**options))


def replica_status(group_id: str = GROUP) -> dict[str, Any]:
    """The replica's own status through a Serve handle (one replica per group here)."""
    from ray import serve

    handle = serve.get_deployment_handle(group_id, app_name=APP)
    return handle.status.remote().result(timeout_s=60).model_dump()


def http_replica(client: httpx.Client, group_id: str, replica_id: str) -> dict[str, Any] | None:
    """The replica's entry in the group status endpoint (the registry's copy), if listed."""
    resp = client.get(f"/api/v2/groups/{group_id}/status")
    assert resp.status_code == 200, resp.text
    found = [r for r in resp.json()["replicas"] if r["replica_id"] == replica_id]
    return found[0] if found else None


def error_of(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in resp.text and 'File "' not in resp.text, resp.text
    return body["error"]


def scrape(port: int, family_name: str) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [
        sample
        for family in text_string_to_metric_families(text)
        if family.name in (family_name, family_name.removesuffix("_total"))
        for sample in family.samples
        if sample.name == family_name and sample.labels.get("application") == APP
    ]


# --- single-flight ------------------------------------------------------------------------


def test_fifty_concurrent_first_requests_for_a_cold_lens_load_it_once(served, wait_until):
    assert COLD not in replica_status()["loads"]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=CONCURRENT_COLD_REQUESTS)
        async with httpx.AsyncClient(
            base_url=served["base_url"], timeout=180, limits=limits
        ) as client:
            url = f"/api/v2/lenses/{COLD}/analyze"
            return await asyncio.gather(
                *(client.post(url, json=analyze_body()) for _ in range(CONCURRENT_COLD_REQUESTS))
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * CONCURRENT_COLD_REQUESTS, [
        (r.status_code, r.text[:200]) for r in responses if r.status_code != 200
    ]
    results = [r.json() for r in responses]
    for result in results[1:]:  # several of them shared batched passes
        assert_same_rows(result["rows"], results[0]["rows"])
    assert {r["meta"]["lens_id"] for r in results} == {COLD}
    status = replica_status()
    assert status["loads"][COLD] == 1

    # The group status endpoint says the same once the replica's push reaches the registry.
    def reported_loads() -> dict[str, int] | None:
        replica = http_replica(served["client"], GROUP, status["replica_id"])
        return replica["loads"] if replica and COLD in replica["loads"] else None

    loads = wait_until(reported_loads, timeout_s=30, what=f"{COLD} in the group status")
    assert loads[COLD] == 1, loads


def test_a_preload_and_request_storm_loads_each_lens_once(served):
    # Two lenses fit the device together (max_lenses_per_replica 2): nothing is evicted
    # during the storm, so any load beyond the first per lens would be a double load.
    before = replica_status()["loads"]
    assert not set(STORM) & set(before), before

    async def storm() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=served["base_url"], timeout=180) as client:
            preload = f"/api/v2/groups/{GROUP}/preload"
            preloads = [client.post(preload, json={"lens_ids": STORM}) for _ in range(8)]
            analyses = [
                client.post(f"/api/v2/lenses/{STORM[i % 2]}/analyze", json=analyze_body())
                for i in range(16)
            ]
            answers = await asyncio.gather(*preloads, *analyses)
            return answers[:8], answers[8:]

    preloads, analyses = asyncio.run(storm())
    for resp in [*preloads, *analyses]:
        assert resp.status_code == 200, resp.text
    for resp in preloads:
        assert [(r["lens_id"], r["ok"]) for r in resp.json()["results"]] == [
            (lens_id, True) for lens_id in STORM
        ], resp.json()
    for lens_id in STORM:
        rows = [r.json()["rows"] for r in analyses if r.json()["meta"]["lens_id"] == lens_id]
        assert len(rows) == 8, lens_id
        for other in rows[1:]:  # concurrent: some shared batched passes
            assert_same_rows(other, rows[0])
    loads = replica_status()["loads"]
    assert {lens_id: loads.get(lens_id) for lens_id in STORM} == dict.fromkeys(STORM, 1)


# --- bad checkpoints at load time ------------------------------------------------------------


def test_a_checkpoint_that_turns_incompatible_fails_only_its_own_lens(served, wait_until):
    import torch

    run_dir: Path = served["incompatible_dir"]
    newest = max(run_dir.glob("checkpoint_step*.pt"), key=checkpoint_step)
    # Our own demo file (it pickles numpy arrays, which weights_only refuses by default).
    blob = torch.load(newest, map_location="cpu", weights_only=False)
    blob["config"]["layer_l"] = 7  # the base has 3 layers
    step = checkpoint_step(newest) + 10
    torch.save(blob, run_dir / f"checkpoint_step{step}_epoch9_.pt")

    client = served["client"]
    for _ in range(2):  # the second answer comes from the back-off, without a read
        error = error_of(analyze(client, INCOMPATIBLE), 409, "incompatible_lens")
        assert INCOMPATIBLE in error["message"], error
        assert any("layer" in problem for problem in error["detail"]["problems"]), error

    replica_id = replica_status()["replica_id"]

    def failed_in_status() -> dict[str, str] | None:
        replica = http_replica(client, GROUP, replica_id)
        failed = replica["lenses"]["failed"] if replica else {}
        return failed if INCOMPATIBLE in failed else None

    failed = wait_until(failed_in_status, timeout_s=30, what=f"{INCOMPATIBLE} marked failed")
    assert "incompatible" in failed[INCOMPATIBLE]
    assert analyze(client, GOOD).status_code == 200
    assert analyze(client, COLD).status_code == 200
    assert replica_status()["base_loads"] == 1


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(served):
    newest: Path = served["newest_fallback"]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    client = served["client"]
    fallback = analyze(client, FALLBACK)
    assert fallback.status_code == 200, fallback.text
    older = analyze(client, OLDER)
    assert older.status_code == 200, older.text
    assert fallback.json()["rows"] == older.json()["rows"]
    assert FALLBACK not in replica_status()["lenses"]["failed"]


def test_a_removed_checkpoint_is_409_and_a_preload_retries_it_at_once(served, wait_until):
    run_dir: Path = served["missing_dir"]
    parked = run_dir.with_name(run_dir.name + "-parked")
    run_dir.rename(parked)
    client = served["client"]
    error = error_of(analyze(client, MISSING), 409, "missing_checkpoint")
    assert MISSING in error["message"] and run_dir.name in error["message"], error
    assert str(run_dir.parent) not in error["message"], error  # files by name, never by path
    assert error["detail"]["lens_id"] == MISSING, error
    replica_id = replica_status()["replica_id"]
    assert MISSING in replica_status()["lenses"]["failed"]

    # Back in place: a preload retries now, without waiting for the back-off.
    parked.rename(run_dir)
    resp = client.post(f"/api/v2/groups/{GROUP}/preload", json={"lens_ids": [MISSING]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["ok"], resp.json()
    assert analyze(client, MISSING).status_code == 200

    def cleared() -> bool:
        replica = http_replica(client, GROUP, replica_id)
        return replica is not None and MISSING not in replica["lenses"]["failed"]

    wait_until(cleared, timeout_s=30, what=f"{MISSING} no longer failed in the group status")


# --- out of memory -----------------------------------------------------------------------------


def test_a_lens_over_the_memory_budget_is_503_and_the_replica_keeps_serving(served):
    client = served["client"]
    assert analyze(client, BUDGET_SMALL).status_code == 200
    before = replica_status(BUDGET_GROUP)
    for _ in range(2):  # not a lens failure: no back-off, every try is a real attempt
        resp = analyze(client, BUDGET_BIG)
        error = error_of(resp, 503, "out_of_memory")
        assert int(resp.headers["Retry-After"]) >= 1
        assert "device_memory_budget_gb" in error["message"], error
    again = analyze(client, BUDGET_SMALL)
    assert again.status_code == 200, again.text
    assert again.json()["meta"]["switch"]["kind"] == "hit"
    after = replica_status(BUDGET_GROUP)
    assert after["replica_id"] == before["replica_id"]
    assert after["lenses"]["failed"] == {}
    assert after["lenses"]["device"] == [BUDGET_SMALL]
    assert client.get("/readyz").status_code == 200


def test_load_failures_are_exported_by_reason(served, ray_cluster, wait_until):
    def counted() -> dict[tuple[str, str], float] | None:
        found: dict[tuple[str, str], float] = {}
        for sample in scrape(ray_cluster.metrics_port, "ray_lens_load_failures_total"):
            key = (sample.labels.get("reason", ""), sample.labels.get("lens", ""))
            found[key] = found.get(key, 0.0) + sample.value
        # Counters are exported every few seconds: wait for both OOM attempts.
        is_done = found.get(("incompatible", INCOMPATIBLE), 0) >= 1
        is_done = is_done and found.get(("missing", MISSING), 0) >= 1
        return found if is_done and found.get(("oom", BUDGET_BIG), 0) >= 2 else None

    found = wait_until(counted, timeout_s=90, what="ray_lens_load_failures_total exported")
    assert not any(lens == FALLBACK for _, lens in found), found


# --- a replica process killed under traffic ------------------------------------------------------


def kill_replica_process(actor_name: str) -> int:
    import ray

    actor = ray.get_actor(actor_name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_replica_answers_503_in_flight_and_serves_again_after_restart(served, wait_until):
    client = served["client"]
    before = replica_status()
    assert before["actor_name"], before
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []

    def slow_request(lens_id: str) -> None:
        body = analyze_body(TEXT * 4, batch_size=1)
        try:
            with httpx.Client(base_url=served["base_url"], timeout=180) as own:
                responses.append(own.post(f"/api/v2/lenses/{lens_id}/analyze", json=body))
        except httpx.HTTPError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=slow_request, args=(lens_id,))
        for lens_id in [GOOD, COLD, GOOD, COLD, GOOD, COLD]
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: replica_status()["in_flight"] >= 2, timeout_s=60, what="requests in flight")
    kill_replica_process(before["actor_name"])

    # The router and the other group keep answering while the replica is gone.
    assert client.get("/healthz").status_code == 200
    assert analyze(client, BUDGET_SMALL).status_code == 200
    for thread in threads:
        thread.join(timeout=200)
    assert not errors, errors
    assert len(responses) == len(threads)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:300]) for r in responses]
    assert 503 in statuses, statuses  # at least the requests computing at the kill
    for resp in responses:
        if resp.status_code == 503:
            error_of(resp, 503, "replica_unavailable")
            assert int(resp.headers["Retry-After"]) >= 1

    seen: list[int] = []

    def served_again() -> httpx.Response | None:
        resp = analyze(client, GOOD)
        seen.append(resp.status_code)
        return resp if resp.status_code == 200 else None

    wait_until(served_again, timeout_s=120, what="a new replica answering")
    assert set(seen) <= {200, 503}, seen
    after = replica_status()
    assert after["replica_id"] != before["replica_id"]
    assert after["base_loads"] == 1
    assert client.get("/readyz").status_code == 200
