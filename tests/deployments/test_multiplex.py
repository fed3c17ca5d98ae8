"""Serve's multiplex LRU under load, through the adapter (deployments/replica/multiplex.py).

One application: the demo qwen2 group (4 lenses) with `max_lenses_per_replica: 2`, so almost
every request switches. Checks what issue 13 asks of the adapter under real Serve: the
private fields it reads exist, every answer equals the single-request answer, Serve's own
load count equals the replica's, and status is truthful within about a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.deployments.conftest import assert_same_rows

APP = "multiplex"
PREFIX = "/multiplex"
GROUP = "qwen2-tiny"
LENSES = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single", "qwen2-tiny-l1-donor"]
BODY = {"text": "The cat sat on the mat.", "options": {"temperature": 0.0, "seed": 0}}
CONCURRENT = 40


@pytest.fixture(scope="module")
def served(ray_cluster, write_groups) -> Iterator[httpx.Client]:
    from ray import serve

    from deployments.app import build_app

    groups_dir = write_groups((GROUP,), replica={"max_lenses_per_replica": 2})
    serve.run(build_app({"groups_dir": str(groups_dir)}), name=APP, route_prefix=PREFIX)
    with httpx.Client(base_url=ray_cluster.http_url + PREFIX, timeout=180) as client:
        yield client
    serve.delete(APP)


def replica_status() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle(GROUP, app_name=APP)
    return handle.status.remote().result(timeout_s=60).model_dump()


def analyze(client: httpx.Client, lens_id: str) -> list[dict[str, Any]]:
    response = client.post(f"/api/v2/lenses/{lens_id}/analyze", json=BODY)
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def test_serve_keeps_the_fields_the_adapter_reads():
    import inspect

    from ray.serve.multiplex import _ModelMultiplexWrapper

    source = inspect.getsource(_ModelMultiplexWrapper)
    for name in ("self.models", "_model_cache_lock", "max_num_models_per_replica",
                 "_push_multiplexed_replica_info", "def unload_model_lru"):  # fmt: skip
        assert name in source, f"Ray's multiplex wrapper no longer has {name}: update multiplex.py"


def test_concurrent_switches_give_the_single_request_answers(served, wait_until):
    single = {lens_id: analyze(served, lens_id) for lens_id in LENSES}
    order = [LENSES[i % len(LENSES)] for i in range(CONCURRENT)]
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        answers = list(pool.map(lambda lens_id: analyze(served, lens_id), order))
    for lens_id, rows in zip(order, answers, strict=True):
        assert_same_rows(rows, single[lens_id])  # concurrent ones shared batched passes
    status = replica_status()
    assert len(status["lenses"]["device"]) <= 2, status["lenses"]
    assert sum(status["switches"].values()) == CONCURRENT + len(LENSES)
    # Requests waiting on one load share it: never more loads than switches that missed.
    misses = status["switches"]["host"] + status["switches"]["disk"] + status["switches"]["first"]
    assert len(LENSES) <= sum(status["loads"].values()) <= misses

    def idle() -> dict[str, Any] | None:
        replica = served.get(f"/api/v2/groups/{GROUP}/status").json()["replicas"][0]
        return replica if replica["in_flight"] == 0 and replica["busy_threads"] == 0 else None

    wait_until(idle, timeout_s=5, what="the group status to show the replica idle")


def test_serve_counts_the_same_loads_as_the_replica(served, ray_cluster, wait_until):
    from prometheus_client.parser import text_string_to_metric_families

    loads = sum(replica_status()["loads"].values())
    url = f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics"

    def serve_loads() -> float | None:
        text = httpx.get(url, timeout=10).text
        total = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "ray_serve_multiplexed_models_load_counter_total"
            and sample.labels.get("application") == APP
        )
        return total if total == loads else None

    wait_until(serve_loads, timeout_s=60, what=f"Serve's multiplex load counter = {loads}")


def test_a_smaller_lru_evicts_through_serve_and_keeps_answering(served, wait_until):
    from ray import serve

    handle = serve.get_deployment_handle(GROUP, app_name=APP)
    handle.reconfigure.remote({"max_lenses_per_replica": 1}).result(timeout_s=60)
    assert len(replica_status()["lenses"]["device"]) == 1
    for lens_id in LENSES[:2]:
        assert analyze(served, lens_id)
    assert replica_status()["lenses"]["device"] == [LENSES[1]]
    handle.reconfigure.remote({"max_lenses_per_replica": 2}).result(timeout_s=60)


def test_an_evicted_lens_in_use_finishes_before_it_leaves(served):
    """A (streaming, in use) is the LRU when C needs its slot: C's load waits for A to end."""
    import json
    import threading

    lens_a, lens_b, lens_c, lens_y = LENSES
    for lens_id in (lens_c, lens_y):  # the device holds [C, Y]
        analyze(served, lens_id)
    assert replica_status()["lenses"]["device"] == [lens_c, lens_y]
    long_body = {"text": " ".join(["word"] * 300), "options": {"temperature": 0.0, "batch_size": 1}}
    url = f"/api/v2/lenses/{lens_a}/analyze?stream=true"
    answers: dict[str, Any] = {}

    with served.stream("POST", url, json=long_body) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["event"] == "progress"  # A loaded (C left) and in use
        analyze(served, lens_b)  # B takes Y's slot: A is now the least recently used

        def ask_c() -> None:
            response = served.post(f"/api/v2/lenses/{lens_c}/analyze", json=BODY)
            answers[lens_c] = response.json()

        waiter = threading.Thread(target=ask_c)
        waiter.start()
        events = [json.loads(line) for line in lines]
        waiter.join(timeout=180)
    meta_a = next(e["meta"] for e in events if e["event"] == "meta")
    switch_c = answers[lens_c]["meta"]["switch"]
    assert switch_c["kind"] in ("disk", "host"), switch_c
    assert switch_c["ready_at"] >= meta_a["finished_at"]  # C's load waited for A's last use
    rows = [e["row"] for e in events if e["event"] == "row"]
    assert events[-1]["event"] == "done" and len(rows) > 300
    status = replica_status()
    assert lens_a in status["lenses"]["host"] and lens_c in status["lenses"]["device"]
