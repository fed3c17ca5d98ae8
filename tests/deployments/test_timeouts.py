"""Per-request timeout and client disconnects on a real Serve app (issue 5, point 4).

A request that outlives `request_timeout_s` is a 504 in the error shape, and the replica's
work for it is cancelled: the lens is released, nothing stays in flight, and the next
request is served at once. A client that hangs up on a plain JSON analysis does the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

APP = "lens-serve-timeouts"
PREFIX = "/timeouts"
GROUP = "timeouts-qwen2"
LENS = "qwen2-tiny-l1"
TIMEOUT_S = 1.0
# Minutes of work if nobody stopped it (one position per batch, 32 samples each, KL at every
# position of ~1600 tokens), so "idle within a minute" can only mean the work was cancelled.
SLOW = {"temperature": 1.0, "seed": 1, "best_of_k": 32, "kl": True, "batch_size": 1}
LONG_TEXT = " ".join(["The river ran past the old mill and the farmers watched it."] * 60)
CANCELLED_WITHIN_S = 60


@pytest.fixture(scope="module")
def base_url(
    ray_cluster: Any, write_groups: Callable[..., Path], wait_until: Callable[..., Any]
) -> Iterator[str]:
    import yaml
    from ray import serve

    from deployments.app import build_app

    groups_dir = write_groups(("qwen2-tiny",))
    path = groups_dir / "qwen2-tiny.yaml"
    data = yaml.safe_load(path.read_text())
    data["group_id"] = GROUP
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    app = build_app({"groups_dir": str(groups_dir), "request_timeout_s": TIMEOUT_S})
    serve.run(app, name=APP, route_prefix=PREFIX)
    url = f"{ray_cluster.http_url}{PREFIX}"
    wait_until(lambda: replicas(url), what=f"{GROUP} replica in the registry")
    try:
        yield url
    finally:
        serve.delete(APP)


def replicas(url: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v2/groups/{GROUP}/status", timeout=10)
    return response.json()["replicas"] if response.status_code == 200 else []


def idle(url: str, since: float) -> bool:
    """Every replica reports, in a status taken after `since` (Unix time), nothing running.

    busy_threads counts torch work still running: a request that is gone but whose analysis
    thread was not stopped keeps it above 0. Only a status taken after the request ended
    counts (an older one would show the replica idle from before the request).
    """
    found = replicas(url)
    return bool(found) and all(
        r["updated_at"] >= since and r["in_flight"] == 0 and r["busy_threads"] == 0 for r in found
    )


def quick_analysis(url: str) -> httpx.Response:
    body = {"text": "A short one.", "options": {"temperature": 0, "calculate_salience": False}}
    return httpx.post(f"{url}/api/v2/lenses/{LENS}/analyze", json=body, timeout=60)


def test_a_request_past_the_timeout_is_504_and_its_work_is_cancelled(base_url, wait_until):
    assert quick_analysis(base_url).status_code == 200  # lens loaded: the timeout is compute
    response = httpx.post(
        f"{base_url}/api/v2/lenses/{LENS}/analyze",
        json={"text": LONG_TEXT, "options": SLOW},
        timeout=120,
    )
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "timeout" and "in time" in error["message"]
    ended = time.time()
    wait_until(lambda: idle(base_url, ended), timeout_s=CANCELLED_WITHIN_S, what="work cancelled")
    assert quick_analysis(base_url).status_code == 200


def test_a_client_that_hangs_up_leaves_nothing_in_flight(base_url, wait_until):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{base_url}/api/v2/lenses/{LENS}/analyze",
            json={"text": LONG_TEXT, "options": SLOW},
            timeout=0.3,
        )
    ended = time.time()
    wait_until(lambda: idle(base_url, ended), timeout_s=CANCELLED_WITHIN_S, what="work cancelled")
    started = quick_analysis(base_url)
    assert started.status_code == 200
    assert started.json()["meta"]["switch"]["kind"] == "hit"
