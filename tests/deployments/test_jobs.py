"""Durable jobs (issue 9): `/api/v2/jobs` through Serve's real HTTP proxy, two ingress replicas.

One application, `lens-serve-jobs`: the qwen demo group, the ingress with two replicas, API
keys on (two keys), a short result TTL. `JobTable` bounds are also checked without Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

APP = "lens-serve-jobs"
PREFIX = "/jobsapp"
KEY = "jobs-key-0123456789"
OTHER_KEY = "jobs-other-key-9876543210"
TTL_S = 6.0
QWEN = "qwen2-tiny-l1"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join(["Researchers read what the model thinks at every token."] * 60)


def deploy(
    name: str, prefix: str, groups_dir: Path, base_url: str, wait: Callable[..., Any], **args: Any
) -> None:
    """Run the app with two ingress replicas (as the KubeRay config does) and wait for it."""
    from ray import serve
    from ray.serve import Application

    from deployments.app import build_app

    app = build_app({"groups_dir": str(groups_dir), **args})
    # NOTE: Application keeps its bound deployment privately; options() keeps the init args.
    app = Application(app._bound_deployment.options(num_replicas=2))
    serve.run(app, name=name, route_prefix=prefix, blocking=False)

    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}{prefix}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait(ready, timeout_s=300, what=f"{name} ready")


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 120) -> Any:
    """Call `fetch` every 0.3 s until `done(value)`; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; last value: {value}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def jobs(
    ray_cluster: Any, write_groups: Any, wait_until: Any, tmp_path_factory: Any
) -> Iterator[httpx.Client]:
    from ray import serve

    keys = tmp_path_factory.mktemp("job-keys") / "keys"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    groups_dir = write_groups(("qwen2-tiny",))
    deploy(APP, PREFIX, groups_dir, ray_cluster.http_url, wait_until,
           api_keys_file=str(keys), jobs_ttl_s=TTL_S, jobs_max_running=2)  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=ray_cluster.http_url + PREFIX, headers=headers, timeout=120) as c:
        yield c
    serve.delete(APP)


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/api/v2/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return poll(lambda: client.get(f"/api/v2/jobs/{job_id}").json(),
                lambda v: v.get("status") not in ("queued", "running"))  # fmt: skip


# --- the table, without Ray ---------------------------------------------------------------


def _record(job_id: str, owner: str | None = "a", nbytes: int = 10) -> Any:
    from deployments.ingress.job_table import JobRecord

    return JobRecord(job_id=job_id, kind="analyze", lens_id="l", group_id="g", owner=owner,
                     runner_id="r", request={}, request_bytes=nbytes, created_at=0.0,
                     lease_until=30.0)  # fmt: skip


def test_job_table_bounds_ttl_owners_and_leases() -> None:
    from deployments.ingress.errors import Overloaded
    from deployments.ingress.job_table import JobGone, JobLimits, JobTable, UnknownJob

    now = [0.0]
    table = JobTable(clock=lambda: now[0])
    limits = JobLimits(max_jobs=2, max_bytes=1000, ttl_seconds=10.0, lease_seconds=30.0)
    table.create(_record("j1"), limits)
    table.create(_record("j2"), limits)
    with pytest.raises(Overloaded):  # both still queued: no room
        table.create(_record("j3"), limits)
    assert table.view(table.get("j2", "a"))["queue_position"] == 2
    assert table.start("j1", limits)
    table.finish("j1", "completed", limits, result_json='{"rows": []}')
    table.create(_record("j3"), limits)  # j1 (finished) is dropped to make room
    with pytest.raises(JobGone):
        table.get("j1", "a")
    with pytest.raises(UnknownJob):  # another owner: told apart from nothing
        table.get("j2", "b")
    assert table.get("j2", None) if table.get("j2", "a").owner is None else True

    # A result over the byte budget fails the job rather than evicting everything.
    assert table.start("j2", limits)
    table.finish("j2", "completed", limits, result_json="x" * 2000)
    assert table.get("j2", "a").status == "failed"
    assert table.get("j2", "a").error["code"] == "result_too_large"

    # A runner that stops renewing its lease: the job fails once the lease runs out.
    assert table.start("j3", limits)
    now[0] = 31.0
    table.sweep(limits)
    assert table.get("j3", "a").status == "failed"
    assert table.get("j3", "a").error["code"] == "replica_unavailable"

    # Results are kept for the TTL after the end, then answer 410.
    now[0] = 50.0
    table.sweep(limits)
    with pytest.raises(JobGone):
        table.get("j3", "a")


def test_cancel_of_a_queued_job_is_immediate() -> None:
    from deployments.ingress.job_table import JobLimits, JobTable

    table = JobTable(clock=lambda: 5.0)
    limits = JobLimits(max_jobs=4, max_bytes=1000, ttl_seconds=10.0)
    table.create(_record("q"), limits)
    record = table.request_cancel("q", "a", limits)
    assert record.status == "cancelled" and record.expires_at == 15.0
    assert not table.start("q", limits)  # its runner then skips it


# --- through Serve -------------------------------------------------------------------------


def test_analyze_job_result_equals_the_analyze_route(jobs: httpx.Client) -> None:
    options = {"temperature": 0, "seed": 1, "kl": True}
    accepted = submit(jobs, {"kind": "analyze", "lens_id": QWEN, "text": TEXT,
                             "options": options})  # fmt: skip
    assert accepted["status"] in ("queued", "running")
    assert accepted["kind"] == "analyze" and accepted["lens_id"] == QWEN
    assert accepted["queue_position"] >= 0
    job = finished(jobs, accepted["job_id"])
    assert job["status"] == "completed", job
    assert job["progress"]["done"] == job["progress"]["total"] > 0
    assert job["timings"]["run_seconds"] >= 0 and job["expires_at"] > job["finished_at"]
    direct = jobs.post(f"/api/v2/lenses/{QWEN}/analyze", json={"text": TEXT, "options": options})
    assert direct.status_code == 200, direct.text
    assert job["result"]["rows"] == direct.json()["rows"]
    assert job["result"]["meta"]["group_id"] == "qwen2-tiny"
    assert job["request"]["text"] == TEXT


def test_a_job_is_read_from_the_other_ingress_replica(jobs: httpx.Client) -> None:
    body = {"kind": "generate", "lens_id": QWEN, "text": TEXT, "max_new_tokens": 2,
            "temperature": 0}  # fmt: skip
    accepted = [submit(jobs, body) for _ in range(4)]
    runners = {a["runner_id"] for a in accepted}
    readers: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for a in accepted:
            resp = jobs.get(f"/api/v2/jobs/{a['job_id']}")
            assert resp.status_code == 200, resp.text
            readers.add(resp.headers["x-lens-serve-ingress"])
            view = resp.json()
            if (
                view["status"] == "completed"
                and view["runner_id"] != resp.headers["x-lens-serve-ingress"]
            ):
                assert view["result"]["continuations"][0]["token_ids"]
                return
        time.sleep(0.2)
    pytest.fail(f"no job read from a replica other than its runner: {runners} {readers}")


def test_another_key_cannot_read_or_cancel_a_job(jobs: httpx.Client) -> None:
    accepted = submit(jobs, {"kind": "generate", "lens_id": QWEN, "text": TEXT,
                             "max_new_tokens": 2})  # fmt: skip
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for method in ("GET", "DELETE"):
        resp = jobs.request(method, f"/api/v2/jobs/{accepted['job_id']}", headers=other)
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "unknown_job"
    resp = jobs.get(f"/api/v2/jobs/{accepted['job_id']}/events", headers=other)
    assert resp.status_code == 404
    no_key = httpx.get(str(jobs.base_url).rstrip("/") + f"/api/v2/jobs/{accepted['job_id']}")
    assert no_key.status_code == 401
    assert finished(jobs, accepted["job_id"])["status"] == "completed"


def test_cancel_stops_a_running_job(jobs: httpx.Client) -> None:
    body = {"kind": "analyze", "lens_id": QWEN, "text": LONG_TEXT,
            "options": {"best_of_k": 16, "batch_size": 1, "kl": True}}  # fmt: skip
    accepted = submit(jobs, body)
    job_id = accepted["job_id"]
    poll(lambda: jobs.get(f"/api/v2/jobs/{job_id}").json(),
         lambda v: v["status"] == "running" and v["progress"])  # fmt: skip
    resp = jobs.delete(f"/api/v2/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["cancel_requested"] or resp.json()["status"] == "cancelled"
    job = finished(jobs, job_id)
    assert job["status"] == "cancelled", job
    assert job["error"]["code"] == "cancelled"
    assert job["progress"]["done"] < job["progress"]["total"]


def test_events_stream_progress_then_the_job(jobs: httpx.Client) -> None:
    accepted = submit(jobs, {"kind": "analyze", "lens_id": QWEN, "text": TEXT,
                             "options": {"temperature": 0, "batch_size": 2}})  # fmt: skip
    events = []
    with jobs.stream("GET", f"/api/v2/jobs/{accepted['job_id']}/events") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done", kinds
    assert "progress" in kinds
    done = events[-1][1]
    assert done["status"] == "completed" and done["result"]["rows"]


def test_send_message_route_and_job_agree(jobs: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_new_tokens": 6,
            "temperature": 0, "prefill": "Sure"}  # fmt: skip
    direct = jobs.post(f"/api/v2/lenses/{QWEN}/send_message", json=body)
    assert direct.status_code == 200, direct.text
    reply = direct.json()
    assert reply["stop_reason"] in ("end_of_turn", "max_tokens")
    assert reply["prefill"] == "Sure" and isinstance(reply["response"], str)
    assert reply["meta"]["group_id"] == "qwen2-tiny"
    job = finished(jobs, submit(jobs, {"kind": "send_message", "lens_id": QWEN, **body})["job_id"])
    assert job["status"] == "completed", job
    assert job["result"]["token_ids"] == reply["token_ids"]


def test_job_results_expire_after_the_ttl(jobs: httpx.Client) -> None:
    accepted = submit(jobs, {"kind": "generate", "lens_id": QWEN, "text": TEXT,
                             "max_new_tokens": 1})  # fmt: skip
    assert finished(jobs, accepted["job_id"])["status"] == "completed"
    resp = poll(lambda: jobs.get(f"/api/v2/jobs/{accepted['job_id']}"),
                lambda r: r.status_code != 200, timeout_s=TTL_S + 30)  # fmt: skip
    assert resp.status_code == 410, resp.text
    assert resp.json()["error"]["code"] == "job_expired"


def test_bad_job_bodies(jobs: httpx.Client) -> None:
    resp = jobs.post("/api/v2/jobs", json={"kind": "train", "lens_id": QWEN, "text": TEXT})
    assert resp.status_code == 422
    resp = jobs.post("/api/v2/jobs", json={"kind": "analyze", "lens_id": "nope", "text": TEXT})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_lens"
    resp = jobs.get("/api/v2/jobs/does-not-exist")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_job"
