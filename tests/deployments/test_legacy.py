"""The old backend's clients against lens-serve (issue 9): REST, slim API, `/ws`, old names.

One application, `lens-serve-legacy`: both demo groups, API keys and a rate limit on, the
old page's origin in `cors_origins`. Requests use the old field names; results are compared
with v2's for the same lens, text and options.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

APP = "lens-serve-legacy"
PREFIX = "/legacyapp"
KEY = "legacy-key-0123456789"
RATE_KEY = "legacy-rate-key-0123456789"
RATE_PER_MINUTE = 200
MAX_TEXT_LENGTH = 3000
OLD_PAGE = "http://localhost:3000"
QWEN = "qwen2-tiny-l1"
GEMMA = "gemma2-tiny-l1"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join(["Researchers read what the model thinks at every token."] * 30)
CHAT = [{"role": "user", "content": "The capital of France is Paris."}]


@pytest.fixture(scope="module")
def legacy(
    ray_cluster: Any, write_groups: Any, wait_until: Any, tmp_path_factory: Any
) -> Iterator[httpx.Client]:
    from ray import serve

    from deployments.app import build_app

    keys = tmp_path_factory.mktemp("legacy-keys") / "keys"
    keys.write_text(f"{KEY}\n{RATE_KEY}\n")
    groups_dir = write_groups(("qwen2-tiny", "gemma2-tiny"))
    args = {"groups_dir": str(groups_dir), "api_keys_file": str(keys),
            "rate_limit_per_minute": RATE_PER_MINUTE, "cors_origins": [OLD_PAGE],
            "max_text_length": MAX_TEXT_LENGTH}  # fmt: skip
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    base = ray_cluster.http_url + PREFIX

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=300, what=f"{APP} ready")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as client:  # fmt: skip
        yield client
    serve.delete(APP)


@pytest.fixture(scope="module")
def ws_url(legacy: httpx.Client) -> str:
    return str(legacy.base_url).rstrip("/").replace("http://", "ws://") + "/ws"


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; last value: {value}")
        time.sleep(0.5)


def finished_status(client: httpx.Client, path: str) -> dict[str, Any]:
    def fetch() -> dict[str, Any]:
        resp = client.get(path)
        assert resp.status_code == 200, resp.text
        return resp.json()

    return poll(fetch, lambda s: s["status"] not in ("queued", "processing"))


def v2_rows(client: httpx.Client, lens_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = client.post(f"/api/v2/lenses/{lens_id}/analyze", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["rows"]


def assert_old_rows_match(old: list[dict], new: list[dict], structured: bool = True) -> None:
    assert len(old) == len(new) > 0
    for o, n in zip(old, new, strict=True):
        assert o["position"] == n["position"] and o["token"] == n["token"]
        assert o["explanation"] == n["explanation"], (o["position"], o, n)
        assert o["mse"] == n["mse"] and o["relative_rmse"] == n["relative_rmse"]
        assert o["token_salience"] == n.get("token_salience")
        assert o["kl_divergence"] == n.get("kl")
        if structured:
            assert o["explanation_structured"] == n["explanation_tokens"]


# --- auth, limits --------------------------------------------------------------------------


def test_every_legacy_route_needs_the_key(legacy: httpx.Client, ws_url: str) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    base = str(legacy.base_url).rstrip("/")
    for method, path in [("POST", "/analyze"), ("GET", "/status/x"), ("GET", "/health"),
                         ("GET", "/api/gpu_stats"), ("POST", "/reset"), ("GET", "/api/slim/models"),
                         ("GET", f"/api/slim/models/{QWEN}/layers"), ("POST", "/api/slim/analyze"),
                         ("POST", "/api/slim/generate"), ("POST", "/api/slim/send_message"),
                         ("GET", "/api/slim/status/x")]:  # fmt: skip
        resp = httpx.request(method, base + path, json={})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "unauthorized"
    with pytest.raises(InvalidStatus):
        with connect(ws_url, open_timeout=30) as socket:
            socket.recv(timeout=10)
    with pytest.raises(InvalidStatus):  # the right key from a site not in cors_origins
        with connect(f"{ws_url}?api_key={KEY}", origin="http://evil.example", open_timeout=30):
            pass


def test_size_and_rate_limits_apply(legacy: httpx.Client, ws_url: str) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    too_long = legacy.post("/analyze", json={"text": "x" * (MAX_TEXT_LENGTH + 1)})
    assert too_long.status_code == 413 and too_long.json()["error"]["code"] == "text_too_long"
    slim = legacy.post(
        "/api/slim/analyze",
        json={
            "model_group": "qwen2-tiny",
            "messages": [{"role": "user", "content": "x" * (MAX_TEXT_LENGTH + 1)}],
        },
    )
    assert slim.status_code == 413  # fmt: skip
    rate = {"Authorization": f"Bearer {RATE_KEY}"}
    statuses = [legacy.get("/api/slim", headers=rate).status_code
                for _ in range(RATE_PER_MINUTE + 60)]  # the bucket refills meanwhile  # fmt: skip
    assert statuses[0] == 200 and 429 in statuses
    with pytest.raises(InvalidStatus):  # that key's bucket is empty: the upgrade is refused
        with connect(f"{ws_url}?api_key={RATE_KEY}", open_timeout=30):
            pass


# --- REST ----------------------------------------------------------------------------------


def test_legacy_analyze_polls_to_the_old_result_and_equals_v2(legacy: httpx.Client) -> None:
    options = {"temperature": 0, "seed": 3, "no_kl": False, "calculate_salience": True,
               "optimize_explanations_config": {"best_of_k": 1}, "use_batched": True}  # fmt: skip
    resp = legacy.post("/analyze", json={"text": TEXT, "options": options, "model_id": QWEN})
    assert resp.status_code == 200, resp.text
    queued = resp.json()
    assert queued["status"] == "queued" and queued["request_id"]
    assert queued["queue_position"] >= 0 and queued["queue_size"] >= 0
    status = finished_status(legacy, f"/status/{queued['request_id']}")
    assert status["status"] == "completed", status
    assert status["created_at"] and status["completed_at"] and status["error"] is None
    assert status["processing_time"] >= 0
    data, metadata = status["result"]["data"], status["result"]["metadata"]
    assert metadata["model_id"] == QWEN and metadata["layer"] == 1
    assert metadata["seed"] == 3 and metadata["best_of_k"] == 1
    v2 = {"text": TEXT, "options": {"temperature": 0, "seed": 3, "best_of_k": 1, "kl": True,
                                    "return_structured": True}}  # fmt: skip
    assert_old_rows_match(data, v2_rows(legacy, QWEN, v2))
    assert {"tuned_lens_top", "logit_lens_top", "layer"} <= set(data[0])


def test_legacy_analyze_defaults_to_the_first_lens(legacy: httpx.Client) -> None:
    resp = legacy.post("/analyze", json={"text": TEXT, "options": {"no_kl": True,
                       "optimize_explanations_config": {"best_of_k": 2}}})  # fmt: skip
    status = finished_status(legacy, f"/status/{resp.json()['request_id']}")
    assert status["status"] == "completed", status
    assert status["result"]["metadata"]["model_id"] in (QWEN, GEMMA, *_lens_ids(legacy))
    assert legacy.get("/status/no-such-request").status_code == 404


def _lens_ids(client: httpx.Client) -> list[str]:
    return [x["lens_id"] for x in client.get("/api/v2/lenses").json()["lenses"]]


def test_health_gpu_stats_and_reset(legacy: httpx.Client) -> None:
    health = legacy.get("/health").json()
    assert health["status"] in ("healthy", "degraded") and "model_loaded" in health
    assert health["gpu_available"] is False and health["status"] == "degraded"  # CPU replicas
    stats = legacy.get("/api/gpu_stats").json()
    assert stats["available"] is False
    assert stats["devices"] and {"memory_used", "memory_total", "utilization",
                                 "memory_percent"} <= set(stats)  # fmt: skip
    device = next(iter(stats["devices"].values()))
    assert device["memory_total"] > 0
    slow = legacy.post("/analyze", json={"text": LONG_TEXT, "model_id": QWEN, "options": {
        "batch_size": 1, "optimize_explanations_config": {"best_of_k": 16}}})  # fmt: skip
    request_id = slow.json()["request_id"]
    reset = legacy.post("/reset")
    assert reset.status_code == 200 and reset.json()["status"] == "reset"
    assert request_id in reset.json()["cancelled"]
    assert "no global model" in reset.json()["message"]
    assert finished_status(legacy, f"/status/{request_id}")["status"] == "cancelled"


# --- slim API, the examples of its documentation ------------------------------------------------


def test_slim_models_and_layers(legacy: httpx.Client) -> None:
    models = legacy.get("/api/slim/models").json()
    groups = {g["id"]: g for g in models["model_groups"]}
    assert set(groups) == {"qwen2-tiny", "gemma2-tiny"}
    assert groups["qwen2-tiny"]["default_layer"] == QWEN
    assert {"name", "description", "is_loaded"} <= set(groups["qwen2-tiny"])
    assert "current_model_id" in models
    layers = legacy.get("/api/slim/models/qwen2-tiny/layers").json()
    assert layers["group_id"] == "qwen2-tiny" and layers["default_layer"] == QWEN
    assert [x["id"] for x in layers["layers"]][0] == QWEN
    assert {"name", "layer", "description", "is_current"} <= set(layers["layers"][0])
    by_lens = legacy.get(f"/api/slim/models/{GEMMA}/layers").json()
    assert by_lens["group_id"] == "gemma2-tiny"
    assert legacy.get("/api/slim/models/nope/layers").status_code == 404


def test_slim_analyze_with_its_defaults_equals_v2(legacy: httpx.Client) -> None:
    resp = legacy.post("/api/slim/analyze", json={"messages": CHAT, "model_group": "qwen2-tiny",
                                                  "best_of_k": 2})  # fmt: skip
    assert resp.status_code == 200, resp.text
    queued = resp.json()
    assert queued["status"] == "queued" and "queued at position" in queued["message"]
    status = finished_status(legacy, f"/api/slim/status/{queued['request_id']}")
    assert status["status"] == "completed", status
    assert set(status) == {"request_id", "status", "result", "error", "processing_time"}
    v2 = {"messages": CHAT, "options": {"temperature": 1.0, "seed": 42, "best_of_k": 2,
                                         "return_structured": True}}  # fmt: skip
    assert_old_rows_match(status["result"]["data"], v2_rows(legacy, QWEN, v2))
    assert all(row["kl_divergence"] is None for row in status["result"]["data"])  # KL off


def test_slim_generate_and_send_message(legacy: httpx.Client) -> None:
    gen = legacy.post(
        "/api/slim/generate",
        json={
            "messages": [{"role": "user", "content": "Write a haiku about coding"}],
            "temperature": 0.7,
            "n_tokens": 5,
            "model_group": "gemma2-tiny",
            "model_id": GEMMA,
        },
    )
    assert gen.status_code == 200, gen.text  # fmt: skip
    status = finished_status(legacy, f"/api/slim/status/{gen.json()['request_id']}")
    assert status["status"] == "completed", status
    completions = status["result"]["completions"]
    assert len(completions) == 1 and isinstance(completions[0], str)
    msg = legacy.post("/api/slim/send_message", json={
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is 2+2?"}],
        "model_group": "qwen2-tiny", "temperature": 0.5, "max_tokens": 8})  # fmt: skip
    assert msg.status_code == 200, msg.text
    status = finished_status(legacy, f"/api/slim/status/{msg.json()['request_id']}")
    assert status["status"] == "completed", status
    assert isinstance(status["result"]["response"], str)
    bad = legacy.post("/api/slim/generate", json={"messages": CHAT, "model_group": "nope"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "unknown_group"
    bounds = legacy.post("/api/slim/analyze", json={"messages": CHAT, "model_group": "qwen2-tiny",
                                                    "best_of_k": 33})  # fmt: skip
    assert bounds.status_code == 422


# --- the /ws protocol ------------------------------------------------------------------------


def recv_until(socket: Any, stop: Callable[[dict], bool], timeout_s: float = 120) -> list[dict]:
    """Messages up to and including the first for which `stop` is true (queue updates skipped)."""
    out = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = json.loads(socket.recv(timeout=deadline - time.monotonic()))
        if message["type"] == "queue_update":
            continue
        out.append(message)
        if stop(message):
            return out
    pytest.fail(f"timed out; got {out}")


def test_ws_greeting_groups_switch_and_info(ws_url: str) -> None:
    from websockets.sync.client import connect

    with connect(f"{ws_url}?api_key={KEY}", origin=OLD_PAGE, open_timeout=30) as socket:
        greeting = recv_until(socket, lambda m: m["type"] == "model_groups_list")
        assert greeting[0]["type"] == "connection_established"
        assert "no global model" in greeting[0]["message"]
        socket.send(json.dumps({"type": "list_model_groups", "refresh": True}))
        listing = recv_until(socket, lambda m: m["type"] == "model_groups_list")[-1]
        groups = {g["group_id"]: g for g in listing["groups"]}
        assert set(groups) == {"qwen2-tiny", "gemma2-tiny"}
        model = groups["qwen2-tiny"]["models"][0]
        assert {"id", "name", "layer", "is_loaded", "is_gpu_loaded", "is_cpu_cached",
                "checkpoint_filename", "is_current"} <= set(model)  # fmt: skip
        assert listing["current_model"] and listing["current_group"]

        socket.send(json.dumps({"type": "switch_model_grouped", "model_id": GEMMA,
                                "group_id": "gemma2-tiny"}))  # fmt: skip
        done = recv_until(socket, lambda m: m["type"].startswith("model_switch"))[-1]
        assert done["type"] == "model_switch_complete" and done["model_id"] == GEMMA
        assert "this connection only" in done["message"] and done["group_id"] == "gemma2-tiny"
        socket.send(json.dumps({"type": "switch_model", "model_id": "nope"}))
        assert recv_until(socket, lambda m: True)[-1]["type"] == "model_switch_error"

        socket.send(json.dumps({"type": "get_model_info", "model_id": QWEN}))
        info = recv_until(socket, lambda m: m["type"] == "model_info")[-1]
        assert info["model_id"] == QWEN and info["display_name"] and info["layer"] == 1
        assert "auto_batch_size_max" in info and "loaded" in info

        socket.send(json.dumps({"type": "no_such_message"}))
        error = recv_until(socket, lambda m: True)[-1]
        assert error["type"] == "error" and "Unknown message type" in error["error"]
        socket.send("{not json")
        assert recv_until(socket, lambda m: True)[-1]["type"] == "error"
        socket.send(json.dumps({"type": "list_model_groups"}))  # still open
        assert recv_until(socket, lambda m: True)[-1]["type"] == "model_groups_list"


def test_ws_analyze_in_the_old_page_shape_equals_v2(legacy: httpx.Client, ws_url: str) -> None:
    from websockets.sync.client import connect

    options = {"temperature": 0, "seed": 5, "calculate_salience": True, "no_kl": True,
               "optimize_explanations_config": {"best_of_k": 1, "n_groups_per_rollout": 256,
                                                "use_batched": True, "temperature": 0.1},
               "use_tuned_lens": False, "use_logit_lens": True}  # fmt: skip
    with connect(f"{ws_url}?api_key={KEY}", origin=OLD_PAGE, open_timeout=30) as socket:
        recv_until(socket, lambda m: m["type"] == "model_groups_list")
        socket.send(json.dumps({"type": "analyze", "text": TEXT, "options": options,
                                "client_request_id": "client_1", "model_id": GEMMA}))  # fmt: skip
        messages = recv_until(socket, lambda m: m["type"] in ("completed", "result", "error"))
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "queued" and "processing" in kinds and kinds[-1] == "completed", kinds
    assert kinds.index("processing") < kinds.index("completed")
    assert all(m.get("client_request_id") == "client_1" for m in messages)
    assert len({m["request_id"] for m in messages}) == 1
    progress = [m for m in messages if m["type"] == "progress"]
    assert progress and progress[-1]["current"] == progress[-1]["total"]
    result = messages[-1]["result"]
    assert result["metadata"]["model_id"] == GEMMA
    v2 = {"text": TEXT, "options": {"temperature": 0, "seed": 5, "best_of_k": 1,
                                    "logit_lens": True, "return_structured": True}}  # fmt: skip
    new = v2_rows(legacy, GEMMA, v2)
    assert_old_rows_match(result["data"], new)
    assert result["data"][0]["logit_lens_top"] == ", ".join(
        e["token"] for e in new[0]["logit_lens_top"]
    )


def test_ws_generate_chat_status_and_cancel(ws_url: str) -> None:
    from websockets.sync.client import connect

    chat = json.dumps([{"role": "user", "content": "Hello"}])
    with connect(f"{ws_url}?api_key={KEY}", origin=OLD_PAGE, open_timeout=30) as socket:
        recv_until(socket, lambda m: m["type"] == "model_groups_list")
        socket.send(json.dumps({"type": "generate", "text": chat, "model_id": QWEN, "options": {
            "num_tokens": 4, "num_completions": 2, "temperature": 0.5, "is_chat": True,
            "return_full_text": True}}))  # fmt: skip
        messages = recv_until(socket, lambda m: m["type"].startswith("generation_"))
        assert messages[0]["type"] == "queued" and messages[0]["context"] == "generation"
        done = messages[-1]
        assert done["type"] == "generation_complete", done
        assert len(done["result"]["completions"]) == 2
        assert all(isinstance(c, str) for c in done["result"]["completions"])

        socket.send(json.dumps({"type": "status", "request_id": done["request_id"]}))
        update = recv_until(socket, lambda m: m["type"] == "status_update")[-1]
        assert update["status"] == "completed"

        for kind, reply in (("cancel_request", "request_cancelled"), ("interrupt", "interrupted")):
            socket.send(
                json.dumps(
                    {
                        "type": "analyze",
                        "text": LONG_TEXT,
                        "model_id": QWEN,
                        "client_request_id": kind,
                        "options": {
                            "batch_size": 1,
                            "optimize_explanations_config": {"best_of_k": 16},
                        },
                    }
                )
            )
            queued = recv_until(socket, lambda m: m["type"] == "queued")[-1]  # fmt: skip
            socket.send(json.dumps({"type": kind, "request_id": queued["request_id"],
                                    "context": "analysis"}))  # fmt: skip
            answer = recv_until(socket, lambda m, r=reply: m["type"] == r)[-1]
            assert answer["request_id"] == queued["request_id"]


def test_ws_generate_and_analyze(ws_url: str) -> None:
    from websockets.sync.client import connect

    with connect(f"{ws_url}?api_key={KEY}", origin=OLD_PAGE, open_timeout=30) as socket:
        recv_until(socket, lambda m: m["type"] == "model_groups_list")
        socket.send(json.dumps({
            "type": "generate_and_analyze", "client_request_id": "c9",
            "generation": {"text": TEXT, "model_id": QWEN,
                           "options": {"num_tokens": 3, "temperature": 0}},
            "analysis": {"options": {"temperature": 0, "no_kl": True,
                                     "optimize_explanations_config": {"best_of_k": 1}}},
        }))  # fmt: skip
        messages = recv_until(socket, lambda m: m["type"] in ("completed", "error"))
    queued = [m for m in messages if m["type"] == "queued"]
    assert [q["context"] for q in queued] == ["generation", "analysis"]
    assert queued[0]["client_request_id"] == "c9_gen" and queued[1]["client_request_id"] == "c9"
    generated = next(m for m in messages if m["type"] == "generation_complete")
    completed = messages[-1]
    assert completed["type"] == "completed", completed
    text = "".join(row["token"] for row in completed["result"]["data"])
    assert generated["result"]["completions"][0].endswith(text[-5:])


def test_ws_preload_and_unload_group_report_real_residency(ws_url: str) -> None:
    from websockets.sync.client import connect

    with connect(f"{ws_url}?api_key={KEY}", origin=OLD_PAGE, open_timeout=30) as socket:
        recv_until(socket, lambda m: m["type"] == "model_groups_list")
        socket.send(json.dumps({"type": "preload_group", "group_id": "gemma2-tiny"}))
        messages = recv_until(socket, lambda m: m["type"] == "group_preload_complete")
        progress = [m for m in messages if m["type"] == "group_preload_progress"]
        assert len(progress) == 3 and progress[-1]["done"] == 3
        assert messages[-1]["group_id"] == "gemma2-tiny"

        def gemma_models() -> dict[str, dict]:
            socket.send(json.dumps({"type": "list_model_groups", "refresh": True}))
            listing = recv_until(socket, lambda m: m["type"] == "model_groups_list")[-1]
            group = next(g for g in listing["groups"] if g["group_id"] == "gemma2-tiny")
            return {m["id"]: m for m in group["models"]}

        # max_lenses_per_replica is 2: two of the three are on the device.
        on_device = poll(gemma_models, lambda ms: sum(m["is_gpu_loaded"] for m in ms.values()) == 2)
        assert sum(m["is_loaded"] for m in on_device.values()) == 2
        socket.send(json.dumps({"type": "unload_group", "group_id": "gemma2-tiny"}))
        done = recv_until(socket, lambda m: m["type"].startswith("group_unload"))[-1]
        assert done["type"] == "group_unload_complete", done
        assert len(done["evicted"]) == 2
        after = poll(gemma_models, lambda ms: not any(m["is_gpu_loaded"] for m in ms.values()))
        assert all(m["is_cpu_cached"] for m in after.values() if m["id"] in done["evicted"])
        socket.send(json.dumps({"type": "unload_group", "group_id": "nope"}))
        assert recv_until(socket, lambda m: True)[-1]["type"] == "group_unload_error"
