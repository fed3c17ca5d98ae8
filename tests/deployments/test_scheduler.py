"""Issue 11: the replica's batching scheduler and activation cache.

Most tests run `GroupServer` in one process (no Ray), where the scheduler is the same code as
under Serve; the last ones run one real Serve app. Checked: concurrent analyses of one lens
and of several lenses of a group share passes and give the unbatched answers (ids equal,
floats to float32 rounding); a cancelled request leaves the others intact; a long request
does not hold back short ones; the activation cache counts a hit for each lens reading a
text at a layer already read, in the status and as a metric.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from deployments.group_files import load_groups
from deployments.replica.server import GroupServer
from lenscore.demo import DEMO_TEXT_PATH

GROUP = "qwen2-tiny"
# Three lenses with equal decoder prompts (one pass), one with others (its own passes).
LENSES = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l1-donor", "qwen2-tiny-l0-single"]
COPY = "qwen2-tiny-l1-copy"  # a second id on qwen2-tiny-l1's checkpoint: same layer and base
TEXTS = [
    "The farmers planted wheat in the valley, and the river ran past the old mill.",
    "A small boat drifted slowly down the river towards the sea at dawn.",
]
FLOATS = ("mse", "relative_rmse", "token_salience", "logit_lens_top")


def copy_lens(demo_dir) -> dict[str, Any]:
    return {"id": COPY, "name": COPY, "checkpoint": str(demo_dir / "lenses" / LENSES[0]),
            "layer": 1}  # fmt: skip


def make_server(write_groups, demo_dir, **replica: Any) -> GroupServer:
    replica = {"max_lenses_per_replica": 5, **replica}
    groups_dir = write_groups(replica=replica, extra_lenses={GROUP: [copy_lens(demo_dir)]})
    return GroupServer(load_groups(groups_dir)[0], device="cpu")


def body(text: str, temperature: float, seed: int, **options: Any) -> dict[str, Any]:
    return {"text": text, "options": {"temperature": temperature, "seed": seed,
                                      "batch_size": 6, **options}}  # fmt: skip


def assert_same_rows(mine: list[dict], ref: list[dict], what: str) -> None:
    """Equal ids and strings; floats equal to float32 rounding (test_batch.py says why)."""
    assert len(mine) == len(ref), what
    for a, b in zip(mine, ref, strict=True):
        where = f"{what} position {b['position']}"
        assert {k: v for k, v in a.items() if k not in FLOATS} == {
            k: v for k, v in b.items() if k not in FLOATS
        }, where
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5), where
        assert a["token_salience"] == pytest.approx(b["token_salience"], rel=1e-4, abs=1e-5)


def requests_of_every_lens() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, lens_id in enumerate(LENSES):
        out.append((lens_id, body(TEXTS[i % 2], 0.0, 0)))
        out.append((lens_id, body(TEXTS[(i + 1) % 2], 0.9, 100 + i, best_of_k=1 + i % 3)))
    return out


async def analyze_all(server: GroupServer, calls: list[tuple[str, dict]]) -> list[dict]:
    return await asyncio.gather(*(server.analyze(b, lens_id=lens_id) for lens_id, b in calls))


def test_concurrent_analyses_of_several_lenses_share_passes_and_equal_unbatched(
    write_groups, demo_dir
):
    server = make_server(write_groups, demo_dir, batch_max_rows=64)
    calls = requests_of_every_lens()

    async def scenario() -> tuple[list[dict], list[dict]]:
        together = await analyze_all(server, calls)
        await server.reconfigure({"batch_max_rows": 0})
        alone = [await server.analyze(b, lens_id=lens_id) for lens_id, b in calls]
        return together, alone

    together, alone = asyncio.run(scenario())
    for (lens_id, b), mine, ref in zip(calls, together, alone, strict=True):
        assert_same_rows(mine["rows"], ref["rows"], f"{lens_id} {b['options']}")
        assert mine["meta"]["options"] == ref["meta"]["options"]
    stats = server.snapshot().batching
    assert stats.max_rows == 0  # reconfigured; the counters are the batched run's
    assert stats.shared_passes > 0 and stats.multi_lens_passes > 0, stats
    assert stats.requests == len(calls) and stats.queued_requests == 0
    assert stats.rows / stats.passes == pytest.approx(stats.mean_rows_per_pass, rel=1e-3)
    assert server.execution.in_flight == 0 and server.snapshot().busy_threads == 0


def long_text(tokens: int) -> str:
    return " ".join(DEMO_TEXT_PATH.read_text().split()[:tokens])


def test_a_cancelled_request_leaves_the_others_results_intact(write_groups, demo_dir):
    server = make_server(write_groups, demo_dir, batch_max_rows=16)
    calls = requests_of_every_lens()[:4]
    doomed = body(long_text(200), 0.0, 0, batch_size=4)

    async def scenario() -> tuple[list[dict], list[dict]]:
        victim = asyncio.ensure_future(server.analyze(doomed, lens_id=LENSES[1]))
        others = asyncio.ensure_future(analyze_all(server, calls))
        while server.scheduler.stats().passes < 3:
            await asyncio.sleep(0.001)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        together = await others
        while server.scheduler.busy:
            await asyncio.sleep(0.001)
        await server.reconfigure({"batch_max_rows": 0})
        alone = [await server.analyze(b, lens_id=lens_id) for lens_id, b in calls]
        return together, alone

    together, alone = asyncio.run(scenario())
    for (lens_id, _), mine, ref in zip(calls, together, alone, strict=True):
        assert_same_rows(mine["rows"], ref["rows"], lens_id)
    # The cancelled request left at a pass boundary, its lens no longer held by it.
    assert server.snapshot().busy_threads == 0
    assert all(r.users == 0 for r in server.residency.slots.resident())


def test_a_long_request_does_not_hold_back_short_ones(write_groups, demo_dir):
    server = make_server(write_groups, demo_dir, batch_max_rows=24)
    long_body = body(long_text(400), 0.0, 0, batch_size=24)
    finished: list[str] = []

    async def run(name: str, lens_id: str, b: dict) -> None:
        await server.analyze(b, lens_id=lens_id)
        finished.append(name)

    async def scenario() -> None:
        long_one = asyncio.ensure_future(run("long", LENSES[0], long_body))
        while server.scheduler.stats().passes < 2:
            await asyncio.sleep(0.001)
        shorts = [
            run(f"short-{i}", lens_id, body(TEXTS[i % 2], 0.0, i))
            for i, lens_id in enumerate(LENSES)
        ]
        await asyncio.gather(long_one, *shorts)

    asyncio.run(scenario())
    assert finished[-1] == "long", finished
    assert len(finished) == 1 + len(LENSES)


def test_the_activation_cache_reads_a_text_once_per_layer_and_model(write_groups, demo_dir):
    server = make_server(write_groups, demo_dir)
    text = TEXTS[0]
    every_lens = [(lens_id, body(text, 0.0, 0)) for lens_id in [*LENSES, COPY]]

    async def scenario() -> tuple[Any, Any]:
        await analyze_all(server, every_lens)
        first = server.snapshot().activation_cache
        await analyze_all(server, every_lens)
        return first, server.snapshot().activation_cache

    first, second = asyncio.run(scenario())
    # (base, layer 1), (base, layer 2), (donor, layer 1), (base, layer 0): four forwards;
    # the copy of qwen2-tiny-l1 reads the base's layer 1 again.
    assert (first.misses, first.hits, first.entries) == (4, 1, 4), first
    assert (second.misses, second.hits) == (4, 6), second
    assert 0 < second.cached_bytes <= second.max_bytes == 256 * 1024**2


def test_a_full_activation_cache_drops_its_least_recently_used_text(write_groups, demo_dir):
    server = make_server(write_groups, demo_dir, activation_cache_mb=0)
    cache = server.activations

    async def run(text: str) -> None:
        await server.analyze(body(text, 0.0, 0), lens_id=LENSES[0])

    async def scenario() -> None:
        await run(TEXTS[0])
        await run(TEXTS[0])
        assert (cache.misses, len(cache)) == (2, 0)  # 0 MiB: off, nothing kept
        await server.reconfigure({"activation_cache_mb": 1})
        await run(TEXTS[0])
        await run(TEXTS[1])
        both = cache.nbytes
        await server.reconfigure({"activation_cache_mb": (both - 1) / 1024**2})
        assert len(cache) == 1  # TEXTS[0], used longest ago, went first
        await run(TEXTS[1])
        await run(TEXTS[0])

    asyncio.run(scenario())
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 5, 1), stats
    assert stats.cached_bytes <= stats.max_bytes


# -- under Serve -----------------------------------------------------------------------------

APP = "scheduler"
PREFIX = "/scheduler"
CLIENTS = 8


@pytest.fixture(scope="module")
def served(ray_cluster, write_groups, demo_dir) -> Iterator[httpx.Client]:
    from ray import serve

    from deployments.app import build_app

    groups_dir = write_groups(
        (GROUP,),
        replica={"max_lenses_per_replica": 5, "batch_max_rows": 128},
        extra_lenses={GROUP: [copy_lens(demo_dir)]},
    )
    serve.run(build_app({"groups_dir": str(groups_dir)}), name=APP, route_prefix=PREFIX)
    with httpx.Client(base_url=ray_cluster.http_url + PREFIX, timeout=180) as client:
        yield client
    serve.delete(APP)


def post(client: httpx.Client, lens_id: str, b: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/api/v2/lenses/{lens_id}/analyze", json=b)
    assert response.status_code == 200, response.text
    return response.json()


def group_status(client: httpx.Client) -> dict[str, Any]:
    (replica,) = client.get(f"/api/v2/groups/{GROUP}/status").json()["replicas"]
    return replica


def test_served_concurrent_analyses_share_passes_and_equal_single_answers(served, wait_until):
    calls = requests_of_every_lens()
    single = [post(served, lens_id, b) for lens_id, b in calls]
    before = group_status(served)["batching"]
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = list(pool.map(lambda call: post(served, *call), calls * 2))
    for (lens_id, b), mine, ref in zip(calls * 2, answers, single * 2, strict=True):
        assert_same_rows(mine["rows"], ref["rows"], f"{lens_id} {b['options']}")

    def shared() -> dict[str, Any] | None:
        batching = group_status(served)["batching"]
        done = batching["requests"] - before["requests"] >= 2 * len(calls)
        return batching if done else None

    batching = wait_until(shared, timeout_s=10, what="the status to count every request")
    assert batching["shared_passes"] > before["shared_passes"], batching


def test_served_activation_cache_hits_show_in_status_and_metrics(served, ray_cluster, wait_until):
    from prometheus_client.parser import text_string_to_metric_families

    text = "Every lens of the group explains this one sentence."
    for lens_id in [*LENSES, COPY]:
        post(served, lens_id, body(text, 0.0, 0))
    status = wait_until(
        lambda: (s := group_status(served))["activation_cache"]["hits"] > 0 and s,
        timeout_s=10,
        what="an activation cache hit in the status",
    )
    cache = status["activation_cache"]
    url = f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics"

    def exported() -> dict[str, float] | None:
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for sample in family.samples:
                if (
                    sample.name == "ray_lens_activation_cache_lookups_total"
                    and sample.labels.get("application") == APP
                ):
                    assert sample.labels["group"] == GROUP
                    counts[sample.labels["result"]] = sample.value
        return counts if counts.get("hit", 0) >= cache["hits"] else None

    counts = wait_until(exported, timeout_s=60, what="lens_activation_cache_lookups exported")
    assert counts["miss"] >= cache["misses"] > 0


def test_a_device_oom_in_a_pass_halves_the_batch_and_retries_once(write_groups, demo_dir):
    import threading

    import torch

    from deployments.replica.scheduler import BatchScheduler, BatchSettings
    from lenscore import OutOfDeviceMemory
    from lenscore.batch import run_works

    server = make_server(write_groups, demo_dir)
    sizes: list[int] = []
    freed: list[bool] = []

    def oom_first(works):
        sizes.append(sum(w.rows for w in works))
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run_works(works)

    def oom_always(works):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    async def free() -> None:
        freed.append(True)

    async def scenario() -> dict:
        resident, _ = await server.residency.acquire(LENSES[0])
        options = server._options(body(TEXTS[0], 0.0, 0), LENSES[0])
        call = {"text": TEXTS[0], "messages": None, "stop": threading.Event(),
                "free_memory": free}  # fmt: skip
        retried = BatchScheduler(BatchSettings(64, 0), run_pass=oom_first)
        result = await retried.analyze(resident.lens, options=options, **call)
        failing = BatchScheduler(BatchSettings(64, 0), run_pass=oom_always)
        with pytest.raises(OutOfDeviceMemory, match="also after freeing idle lenses"):
            await failing.analyze(resident.lens, options=options, **call)
        resident.release()
        return result

    result = asyncio.run(scenario())
    assert sizes[0] == 6 and result["meta"]["options"]["batch_size"] == 3  # halved
    assert sizes[1] == 3 and freed == [True, True]  # the retry's first decode: 3 rows
    alone = server.snapshot()  # the replica itself was not involved
    assert alone.batching.passes == 0
