"""Parallel preloading, predictive prefetch into the host tier, packed lens files on a replica.

Most tests drive `GroupServer` in one process (the in-process multiplexer has Serve's lock and
LRU contract, as in test_serve_tiers.py); the last one runs the same through Serve and HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx
import pytest
from ray import serve

from deployments.app import build_app
from deployments.group_files import load_groups
from deployments.replica.server import GroupServer
from lenscore import read_checkpoint
from lenscore.packed import pack_checkpoint

LENSES = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"]
BODY = {"text": "The quick brown fox jumps.", "options": {"temperature": 0.0, "seed": 1}}
GIB = 1024**3
APP = "lens-serve-preload"


def stepped_lenses(demo_dir, manifest, count: int) -> list[dict[str, Any]]:
    """`count` more lens ids over the three qwen checkpoints, to step through in order."""
    out = []
    for i in range(count):
        lens_id = LENSES[i % len(LENSES)]
        entry = manifest["lenses"][lens_id]
        out.append({"id": f"step-{i}", "name": f"step {i}", "layer": entry["layer"],
                    "checkpoint": str(demo_dir / entry["checkpoint"])})  # fmt: skip
    return out


def two_lens_budget_gb(demo_dir) -> float:
    """A host tier with room for two (and a half) of the qwen demo lenses."""
    largest = max(read_checkpoint(demo_dir / "lenses" / lens_id).tensor_bytes for lens_id in LENSES)
    return 2.5 * largest / GIB


def make_server(write_groups, extra=None, **replica: Any) -> GroupServer:
    groups_dir = write_groups(replica=replica, extra_lenses={"qwen2-tiny": extra or []})
    return GroupServer(load_groups(groups_dir)[0], device="cpu")


def count_reads(server: GroupServer, barrier: threading.Barrier | None = None) -> list[str]:
    """Wrap the replica's disk read (a seam): record each lens read, optionally meet a barrier."""
    reads: list[str] = []
    read = server.residency.read_ahead.read

    def counted(lens_id: str):
        reads.append(lens_id)
        if barrier is not None:
            barrier.wait()  # every read must be running at once, or this times out
        return read(lens_id)

    server.residency.read_ahead.read = counted
    return reads


def test_parallel_preload_reads_every_lens_at_once_and_loads_each_once(write_groups):
    server = make_server(write_groups, max_lenses_per_replica=4)
    # Serve's lock admits one load at a time: the reads can only meet here if they all run
    # before their loads take the lock.
    reads = count_reads(server, threading.Barrier(len(LENSES), timeout=60))

    async def scenario() -> list[dict[str, Any]]:
        calls = [server.ensure_lens(lens_id=lens_id) for lens_id in LENSES * 2]
        return await asyncio.gather(*calls)

    results = asyncio.run(scenario())
    assert sorted(reads) == sorted(LENSES)
    status = server.snapshot()
    assert status.loads == dict.fromkeys(LENSES, 1)
    assert sorted(status.lenses.device) == sorted(LENSES)
    assert all(r["lens_id"] in LENSES for r in results)
    assert status.prefetch.reads_started == len(LENSES)


def test_a_request_cancelled_while_waiting_drops_its_read(write_groups):
    server = make_server(write_groups, max_lenses_per_replica=4)
    residency = server.residency

    async def scenario() -> None:
        async with residency.slots.locked():  # a load in progress holds the lock
            waiting = asyncio.ensure_future(server.ensure_lens(lens_id=LENSES[0]))
            for _ in range(100):
                if LENSES[0] in residency.read_ahead:
                    break
                await asyncio.sleep(0.01)
            assert LENSES[0] in residency.read_ahead
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert LENSES[0] not in residency.read_ahead
        assert residency.read_ahead.acquiring == 0
        assert (await server.ensure_lens(lens_id=LENSES[0]))["kind"] == "first"

    asyncio.run(scenario())


def test_the_eviction_making_room_never_pushes_out_the_host_lens_being_switched_to(
    write_groups, demo_dir
):
    one_lens_gb = 1.2 * read_checkpoint(demo_dir / "lenses" / LENSES[0]).tensor_bytes / GIB
    server = make_server(write_groups, max_lenses_per_replica=1, host_cache_gb=one_lens_gb)

    async def scenario() -> list[str]:
        kinds = []
        for lens_id in (LENSES[0], LENSES[1], LENSES[0]):
            kinds.append((await server.ensure_lens(lens_id=lens_id))["kind"])
        return kinds

    # Serve evicts LENSES[1] into the full host tier before loading LENSES[0] from it: the
    # evicted lens is the one dropped.
    assert asyncio.run(scenario()) == ["first", "disk", "host"]
    status = server.snapshot()
    assert status.lenses.device == [LENSES[0]] and status.lenses.host == []
    assert status.memory.host_bytes <= server.residency.host.capacity_bytes


async def step_through(server: GroupServer, lens_ids: list[str], sweeps: int, check=None):
    """Request each lens in turn, `sweeps` times, letting the replica go idle in between."""
    kinds = []
    for _ in range(sweeps):
        for lens_id in lens_ids:
            result = await server.analyze(BODY, lens_id=lens_id)
            kinds.append(result["meta"]["switch"]["kind"])
            if check is not None:
                check()
            await server.residency.prefetch.settle()
            if check is not None:
                check()
    return kinds


def test_predictive_prefetch_never_exceeds_the_host_budget(write_groups, demo_dir, demo_manifest):
    extra = stepped_lenses(demo_dir, demo_manifest, 6)
    ids = [lens["id"] for lens in extra]
    # Room for two lenses: a prefetch must fit beside whatever the evictions put there.
    server = make_server(write_groups, extra, max_lenses_per_replica=1,
                         host_cache_gb=two_lens_budget_gb(demo_dir),
                         predictive_prefetch=True)  # fmt: skip
    host = server.residency.host
    seen: list[int] = []

    def check() -> None:
        seen.append(host.nbytes + host.reserved_bytes)
        assert host.nbytes + host.reserved_bytes <= host.capacity_bytes

    read = server.residency.read_ahead.read

    def checked_read(lens_id: str):
        check()  # while a prefetch reads, its bytes are reserved in the tier
        return read(lens_id)

    server.residency.read_ahead.read = checked_read
    kinds = asyncio.run(step_through(server, ids, sweeps=3, check=check))
    status = server.snapshot()
    assert status.prefetch.enabled and status.prefetch.prefetched > 0
    # Once the first sweep and the step back to its start taught every transition, each
    # next lens was prefetched.
    assert kinds[len(ids) + 1 :] == ["prefetch"] * (2 * len(ids) - 1), kinds
    assert status.switches["prefetch"] == status.prefetch.hits == 2 * len(ids) - 1
    assert max(seen) <= host.capacity_bytes


def test_a_budget_below_one_lens_prefetches_nothing(write_groups, demo_dir, demo_manifest):
    extra = stepped_lenses(demo_dir, demo_manifest, 4)
    server = make_server(write_groups, extra, max_lenses_per_replica=1, host_cache_gb=1e-6,
                         predictive_prefetch=True)  # fmt: skip
    kinds = asyncio.run(step_through(server, [lens["id"] for lens in extra], sweeps=2))
    status = server.snapshot()
    assert status.prefetch.prefetched == 0 and "prefetch" not in kinds
    assert status.memory.host_bytes == 0


def test_prefetch_is_off_by_default_and_follows_user_config(write_groups, demo_dir, demo_manifest):
    extra = stepped_lenses(demo_dir, demo_manifest, 4)
    ids = [lens["id"] for lens in extra]
    server = make_server(write_groups, extra, max_lenses_per_replica=1,
                         host_cache_gb=two_lens_budget_gb(demo_dir))  # fmt: skip

    async def scenario() -> None:
        await step_through(server, ids, sweeps=2)
        assert server.snapshot().prefetch.prefetched == 0
        await server.reconfigure({"predictive_prefetch": True})
        kinds = await step_through(server, ids, sweeps=1)
        assert "prefetch" in kinds and server.snapshot().prefetch.enabled
        await server.reconfigure({"predictive_prefetch": False})
        before = server.snapshot().prefetch.prefetched
        await step_through(server, ids, sweeps=1)
        assert server.snapshot().prefetch.prefetched == before

    asyncio.run(scenario())


def test_replica_reads_fresh_packed_files_and_falls_back_on_a_bad_one(
    write_groups, demo_dir, tmp_path, caplog
):
    cache = tmp_path / "packed"
    for lens_id in LENSES:
        pack_checkpoint(demo_dir / "lenses" / lens_id, cache)
    plain = make_server(write_groups, max_lenses_per_replica=4)
    packed = make_server(write_groups, max_lenses_per_replica=4, packed_cache_dir=str(cache))
    sources: list[Any] = []
    read = packed.residency.read_ahead.read

    def recorded(lens_id: str):
        checkpoint, raw = read(lens_id)
        sources.append(raw.packed)
        return checkpoint, raw

    packed.residency.read_ahead.read = recorded
    for lens_id in LENSES:
        a = asyncio.run(plain.analyze(BODY, lens_id=lens_id))
        b = asyncio.run(packed.analyze(BODY, lens_id=lens_id))
        assert a["rows"] == b["rows"], lens_id
    assert all(source is not None for source in sources)
    # A damaged packed file: the replica logs it and reads the trainer file.
    next(cache.glob("*.safetensors")).write_bytes(b"\0" * 64)
    fresh = make_server(write_groups, max_lenses_per_replica=4, packed_cache_dir=str(cache))
    with caplog.at_level(logging.WARNING, logger="lenscore.packed"):
        for lens_id in LENSES:
            assert asyncio.run(fresh.analyze(BODY, lens_id=lens_id))["rows"]
    assert any("reading the trainer checkpoint" in r.getMessage() for r in caplog.records)


def test_serve_preload_loads_each_lens_once_and_prefetch_hits_are_their_own_kind(
    ray_cluster, write_groups, demo_dir, demo_manifest, wait_until
):
    extra = stepped_lenses(demo_dir, demo_manifest, 4)
    ids = [lens["id"] for lens in extra]
    groups_dir = write_groups(
        replica={
            "max_lenses_per_replica": 1,
            "host_cache_gb": two_lens_budget_gb(demo_dir),
            "predictive_prefetch": True,
        },
        extra_lenses={"qwen2-tiny": extra},
    )
    serve.run(build_app({"groups_dir": str(groups_dir)}), name=APP, route_prefix="/preload-test")
    url = f"{ray_cluster.http_url}/preload-test"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, what="readiness")
            preload = client.post("/api/v2/groups/qwen2-tiny/preload", json={"lens_ids": ids})
            assert preload.status_code == 200, preload.text
            assert all(item["ok"] for item in preload.json()["results"])

            def replica() -> dict[str, Any]:
                found = client.get("/api/v2/groups/qwen2-tiny/status").json()["replicas"]
                return found[0] if found else {}

            loads = wait_until(lambda: replica().get("loads"), what="status")
            assert all(loads[lens_id] == 1 for lens_id in ids), loads
            kinds = []
            for _ in range(3):
                for lens_id in ids:
                    answer = client.post(f"/api/v2/lenses/{lens_id}/analyze", json=BODY)
                    assert answer.status_code == 200, answer.text
                    kinds.append(answer.json()["meta"]["switch"]["kind"])
                    wait_until(
                        lambda: not replica()["in_flight"], what="idle replica"
                    )  # the prefetch runs while the replica is idle
            assert "prefetch" in kinds, kinds
            status = wait_until(lambda: replica().get("prefetch", {}).get("hits"), what="hits")
            assert status > 0
            assert set(replica()["switches"]) == {"hit", "host", "prefetch", "disk", "first"}
    finally:
        serve.delete(APP)
