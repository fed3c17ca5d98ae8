"""GroupServer in one process (no Ray): memory budget, eviction under use, OOM retry, stream.

The same code path as under Serve, with the in-process multiplexer `bench/switch.py` uses;
the Serve-side behaviour is covered in test_serve_group.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from deployments.group_files import load_groups
from deployments.replica.server import GroupServer
from lenscore import Cancelled, OutOfDeviceMemory, analyze, generate

LENSES = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"]
BODY = {"text": "The quick brown fox jumps.", "options": {"temperature": 0.0}}
GIB = 1024**3


def make_server(write_groups, **replica: Any) -> GroupServer:
    group = load_groups(write_groups(replica=replica))[0]
    return GroupServer(group, device="cpu")


def test_memory_budget_evicts_lenses_before_a_load(write_groups):
    server = make_server(write_groups, max_lenses_per_replica=4)

    async def scenario() -> None:
        await server.ensure_lens(lens_id=LENSES[0])
        used = server.base.nbytes + server.memory().lens_bytes
        # Room for the base and one lens: the next load must evict the first.
        await server.reconfigure({"device_memory_budget_gb": (used + 1024) / GIB})
        await server.ensure_lens(lens_id=LENSES[1])
        lenses = (await server.status()).lenses.model_dump()
        assert lenses["device"] == [LENSES[1]]
        assert lenses["host"] == [LENSES[0]]

    asyncio.run(scenario())


def test_budget_below_the_base_raises_out_of_device_memory_and_keeps_serving(write_groups):
    server = make_server(write_groups)

    async def scenario() -> None:
        await server.reconfigure({"device_memory_budget_gb": server.base.nbytes / 2 / GIB})
        with pytest.raises(OutOfDeviceMemory):
            await server.ensure_lens(lens_id=LENSES[0])
        assert (await server.status()).lenses.failed == {}  # not the lens's fault
        await server.reconfigure({})
        assert (await server.analyze(BODY, lens_id=LENSES[0]))["rows"]

    asyncio.run(scenario())


def test_an_evicted_lens_waits_for_its_last_user(write_groups):
    server = make_server(write_groups, max_lenses_per_replica=1)

    async def scenario() -> None:
        async with server.execution.using(LENSES[0]):
            load_other = asyncio.ensure_future(server.ensure_lens(lens_id=LENSES[1]))
            for _ in range(50):
                await asyncio.sleep(0)  # let the eviction start and block
            assert not load_other.done()
            assert LENSES[0] not in server.residency.host
        await asyncio.wait_for(load_other, 60)
        assert LENSES[0] in server.residency.host
        assert [r.lens_id for r in server.residency.slots.resident()] == [LENSES[1]]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "oom",
    [
        torch.OutOfMemoryError("CUDA out of memory (injected)"),
        OutOfDeviceMemory("out of device memory (as lenscore reports it)"),
    ],
)
def test_device_oom_evicts_idle_lenses_and_retries_with_half_the_batch(write_groups, demo_dir, oom):
    batches: list[int] = []

    def oom_once(lens, **kwargs: Any) -> dict[str, Any]:
        batches.append(kwargs["options"].batch_size)
        if len(batches) == 1:
            raise oom
        return analyze(lens, **kwargs)

    group = load_groups(write_groups(replica={"max_lenses_per_replica": 2}))[0]
    server = GroupServer(group, device="cpu", run_analysis=oom_once)

    async def scenario() -> None:
        await server.ensure_lens(lens_id=LENSES[1])
        result = await server.analyze(BODY, lens_id=LENSES[0])
        assert result["rows"]
        assert batches == [48, 24]
        assert [r.lens_id for r in server.residency.slots.resident()] == [LENSES[0]]
        assert LENSES[1] in server.residency.host

    asyncio.run(scenario())


def test_stream_yields_progress_meta_rows_and_done(write_groups):
    server = make_server(write_groups)

    async def scenario() -> list[dict[str, Any]]:
        return [e async for e in server.analyze_stream(BODY, lens_id=LENSES[0])]

    events = asyncio.run(scenario())
    kinds = [e["event"] for e in events]
    assert kinds[0] == "progress" and kinds[-1] == "done"
    meta_at = kinds.index("meta")
    assert set(kinds[:meta_at]) == {"progress"}
    assert set(kinds[meta_at + 1 : -1]) == {"row"}
    assert events[meta_at]["meta"]["switch"]["kind"] == "first"
    assert server.execution.in_flight == 0
    assert server.residency.slots.resident()[0].users == 0


def test_closing_a_stream_stops_the_analysis_between_batches(write_groups):
    outcomes: list[str] = []

    def recording(lens, **kwargs: Any) -> dict[str, Any]:
        try:
            result = analyze(lens, **kwargs)
        except Cancelled:
            outcomes.append("cancelled")
            raise
        outcomes.append("finished")
        return result

    group = load_groups(write_groups())[0]
    server = GroupServer(group, device="cpu", run_analysis=recording)
    body = {"text": " ".join(["word"] * 200), "options": {"temperature": 0.0, "batch_size": 1}}

    async def scenario() -> int:
        stream = server.analyze_stream(body, lens_id=LENSES[0])
        first = await stream.__anext__()
        await stream.aclose()
        resident = server.residency.slots.resident()[0]
        for _ in range(2000):  # the thread finishes its current batch, then stops
            if not resident.users and outcomes:
                break
            await asyncio.sleep(0.01)
        return first["total"]

    assert asyncio.run(scenario()) > 50
    assert outcomes == ["cancelled"]
    assert server.residency.slots.resident()[0].users == 0
    assert server.execution.in_flight == 0


GEN_BODY = {"text": "Once upon a time", "max_new_tokens": 4, "temperature": 0.0}


def test_generate_frees_memory_and_retries_once_then_answers_503(write_groups):
    calls: list[str] = []

    def oom_twice_then_ok(lens, **kwargs: Any) -> dict[str, Any]:
        calls.append(lens.lens_id)
        if kwargs.get("max_new_tokens") == 5:  # the second request: OOM, and OOM again
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return generate(lens, **kwargs)

    group = load_groups(write_groups(replica={"max_lenses_per_replica": 2}))[0]
    server = GroupServer(group, device="cpu", run_generation=oom_twice_then_ok)

    async def scenario() -> None:
        await server.ensure_lens(lens_id=LENSES[1])
        ok = await server.generate(GEN_BODY, lens_id=LENSES[0])
        assert ok["continuations"][0]["token_ids"]
        with pytest.raises(OutOfDeviceMemory) as info:
            await server.generate({**GEN_BODY, "max_new_tokens": 5}, lens_id=LENSES[0])
        assert "retry later" in info.value.message
        # The retry came after idle lenses left the device (the first OOM freed them).
        assert [r.lens_id for r in server.residency.slots.resident()] == [LENSES[0]]
        assert LENSES[1] in server.residency.host
        assert server.execution.in_flight == 0 and server.execution.busy_threads == 0

    asyncio.run(scenario())
    assert len(calls) == 3


def test_a_cancelled_generation_stops_at_the_next_token(write_groups):
    outcomes: list[str] = []

    def recording(lens, **kwargs: Any) -> dict[str, Any]:
        try:
            result = generate(lens, **kwargs)
        except Cancelled:
            outcomes.append("cancelled")
            raise
        outcomes.append("finished")
        return result

    server = GroupServer(load_groups(write_groups())[0], device="cpu", run_generation=recording)
    body = {"text": "Once upon a time", "max_new_tokens": 1024, "num_continuations": 16}

    async def scenario() -> None:
        await server.ensure_lens(lens_id=LENSES[0])
        task = asyncio.ensure_future(server.generate(body, lens_id=LENSES[0]))
        for _ in range(500):  # until its thread runs
            if server.execution.busy_threads:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):
            if outcomes:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert outcomes == ["cancelled"]
    assert server.execution.busy_threads == 0


def test_status_shows_a_smaller_cache_only_once_the_lenses_fit_it(write_groups):
    server = make_server(write_groups, max_lenses_per_replica=3)

    async def scenario() -> list[tuple[int, int]]:
        for lens_id in LENSES:
            await server.ensure_lens(lens_id=lens_id)
        shrink = asyncio.ensure_future(server.reconfigure({"max_lenses_per_replica": 1}))
        seen = []
        while not shrink.done():
            snapshot = server.snapshot()
            seen.append((snapshot.max_lenses_per_replica, len(snapshot.lenses.device)))
            await asyncio.sleep(0)
        await shrink
        snapshot = server.snapshot()
        return [*seen, (snapshot.max_lenses_per_replica, len(snapshot.lenses.device))]

    seen = asyncio.run(scenario())
    assert (3, 3) in seen  # the status was read while the evictions ran
    assert seen[-1] == (1, 1)
    assert all(device <= limit for limit, device in seen), seen
