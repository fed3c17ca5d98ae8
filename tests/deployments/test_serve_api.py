"""The v2 HTTP API through Serve's real HTTP proxy (DESIGN §HTTP API, issue 3 and 5).

Two applications: `lens-serve-api` (auth off; both demo groups, gemma with 2 replicas) and
`lens-serve-auth` (API key file and a rate limit; one small group) at another route prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

APP = "lens-serve-api"
AUTH_APP = "lens-serve-auth"
AUTH_PREFIX = "/secure"
API_KEY = "test-key-0123456789"
MAX_TEXT_LENGTH = 2000
AUTH_RATE_PER_MINUTE = 6
TEXT = "The quick brown fox jumps over the lazy dog."

QWEN = "qwen2-tiny-l1"
GEMMA = "gemma2-tiny-l1"
COLD_GROUP = "qwen2-cold"
COLD_LENS = "qwen2-cold-l1"  # the checkpoint of qwen2-tiny-l1 in a group that scales to zero
GROUP_IDS = ["gemma2-tiny", COLD_GROUP, "qwen2-tiny"]
ALLOWED_ORIGIN = "http://allowed.example"


def _error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "detail"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _deploy(
    name: str, route_prefix: str, groups_dir: Path, wait_until: Any, base_url: str, **args: Any
) -> None:
    from ray import serve

    from deployments.app import build_app

    serve.run(
        build_app({"groups_dir": str(groups_dir), **args}),
        name=name,
        route_prefix=route_prefix,
        blocking=False,
    )
    wait_until(
        lambda: _is_ready(f"{base_url}{route_prefix.rstrip('/')}/readyz"),
        timeout_s=300,
        what=f"{name} ready",
    )


def _is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def api(ray_cluster: Any, write_groups: Any, wait_until: Any) -> Iterator[httpx.Client]:
    from ray import serve

    groups_dir = write_groups(("qwen2-tiny", "gemma2-tiny"))
    gemma_file = groups_dir / "gemma2-tiny.yaml"
    gemma = yaml.safe_load(gemma_file.read_text())
    gemma["replica"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    gemma_file.write_text(yaml.safe_dump(gemma, sort_keys=False))
    # A group that scales to zero: its first request waits for a replica (a cold start).
    cold = yaml.safe_load((groups_dir / "qwen2-tiny.yaml").read_text())
    cold["group_id"] = COLD_GROUP
    cold["replica"]["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
    # One request running and one queued: a third concurrent one is refused (overloaded).
    cold["replica"]["max_ongoing_requests"] = 1
    cold["replica"]["max_queued_requests"] = 1
    cold["donors"] = []
    cold["lenses"] = [{**cold["lenses"][0], "id": COLD_LENS, "name": COLD_LENS}]
    (groups_dir / f"{COLD_GROUP}.yaml").write_text(yaml.safe_dump(cold, sort_keys=False))
    _deploy(APP, "/", groups_dir, wait_until, ray_cluster.http_url, max_text_length=MAX_TEXT_LENGTH)
    with httpx.Client(base_url=ray_cluster.http_url, timeout=120) as client:
        yield client
    serve.delete(APP)


@pytest.fixture(scope="module")
def secure(
    api: httpx.Client, ray_cluster: Any, write_groups: Any, wait_until: Any, tmp_path_factory: Any
) -> Iterator[httpx.Client]:
    from ray import serve

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# test keys\n{API_KEY}\n")
    groups_dir = write_groups(("qwen2-tiny",))
    _deploy(
        AUTH_APP,
        AUTH_PREFIX,
        groups_dir,
        wait_until,
        ray_cluster.http_url,
        api_keys_file=str(keys),
        rate_limit_per_minute=AUTH_RATE_PER_MINUTE,
        cors_origins=[ALLOWED_ORIGIN],
    )
    with httpx.Client(base_url=ray_cluster.http_url + AUTH_PREFIX, timeout=120) as client:
        yield client
    serve.delete(AUTH_APP)


def _analyze(client: httpx.Client, lens_id: str, text: str = TEXT, **options: Any) -> Any:
    body = {"text": text, "options": {"temperature": 0, "seed": 0, **options}}
    return client.post(f"/api/v2/lenses/{lens_id}/analyze", json=body)


# --- pieces without Ray ------------------------------------------------------------------------


def test_every_lenscore_error_code_has_an_http_status() -> None:
    import lenscore
    from deployments.ingress.errors import STATUS

    codes = {
        getattr(lenscore, name).code
        for name in lenscore.__all__
        if isinstance(getattr(lenscore, name), type)
        and issubclass(getattr(lenscore, name), lenscore.LensError)
        and getattr(lenscore, name) is not lenscore.LensError
    }
    assert codes and codes <= set(STATUS), codes - set(STATUS)


def test_translate_unwraps_a_replica_lens_error() -> None:
    from ray.exceptions import RayTaskError

    from deployments.ingress.errors import error_body, status_of, translate
    from lenscore import BadInput

    cause = BadInput("the input has 1 token(s); at least 2 are needed", {"tokens": 1})
    wrapped = RayTaskError("analyze", "Traceback (most recent call last): ...", cause)
    for raised in (wrapped, wrapped.as_instanceof_cause()):
        found = translate(raised)
        assert found is cause
        assert status_of(found) == 422
        assert error_body(found)["error"]["message"] == cause.message


def test_rate_limiter_refills_at_the_configured_rate() -> None:
    from deployments.ingress.auth import RateLimiter

    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one token a second, bursts of 60
    assert all(limiter.acquire("a") is None for _ in range(60))
    wait = limiter.acquire("a")
    assert wait == pytest.approx(1.0)
    assert limiter.acquire("b") is None  # other clients have their own bucket
    now[0] += 1.0
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None


def test_api_keys_match_exactly() -> None:
    from deployments.ingress.auth import Guard

    guard = Guard(["alpha-key", "beta-key"], None)
    assert guard.is_enabled
    assert guard.is_valid_key("alpha-key") and guard.is_valid_key("beta-key")
    for wrong in ("alpha", "alpha-key ", "", "ALPHA-KEY", "beta-keyx"):
        assert not guard.is_valid_key(wrong), wrong
    assert not Guard([], None).is_enabled


# --- routing and results -------------------------------------------------------------------


def test_health_and_readiness_need_no_key(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "groups": [], "unavailable_groups": {}}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["groups"] == GROUP_IDS


def test_analyze_routes_each_lens_to_its_group(api: httpx.Client) -> None:
    for lens_id, group_id in ((QWEN, "qwen2-tiny"), (GEMMA, "gemma2-tiny")):
        resp = _analyze(api, lens_id)
        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["meta"]["lens_id"] == lens_id
        assert result["meta"]["group_id"] == group_id
        assert result["rows"], result
        assert [row["position"] for row in result["rows"]] == list(range(len(result["rows"])))


def test_greedy_http_result_equals_lenscore_directly(
    api: httpx.Client, demo_dir: Path, demo_manifest: dict
) -> None:
    from lenscore import AnalysisOptions, analyze, load_base, load_lens

    entry = demo_manifest["lenses"][QWEN]
    base = load_base(demo_dir / demo_manifest["bases"][entry["base"]], dtype="float32")
    lens = load_lens(demo_dir / entry["checkpoint"], base, lens_id=QWEN)
    options = {"temperature": 0, "seed": 0, "calculate_salience": True}
    direct = analyze(lens, text=TEXT, options=AnalysisOptions.from_dict(options))
    resp = _analyze(api, QWEN, **options)
    assert resp.status_code == 200, resp.text
    served = resp.json()
    assert len(served["rows"]) == len(direct["rows"])
    for mine, theirs in zip(served["rows"], direct["rows"], strict=True):
        assert mine["token_id"] == theirs["token_id"], mine["position"]
        assert mine["explanation_token_ids"] == theirs["explanation_token_ids"], (
            mine["position"],
            mine["explanation"],
            theirs["explanation"],
        )
        assert mine["explanation"] == theirs["explanation"]
        # Replica and test process may use different intra-op thread counts.
        assert mine["mse"] == pytest.approx(theirs["mse"], rel=1e-4, abs=1e-7), mine["position"]
        assert mine["token_salience"] == pytest.approx(theirs["token_salience"], rel=1e-3, abs=1e-6)


def test_generate_returns_continuations(api: httpx.Client) -> None:
    body = {"text": TEXT, "max_new_tokens": 3, "temperature": 0, "num_continuations": 2}
    resp = api.post(f"/api/v2/lenses/{GEMMA}/generate", json=body)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["meta"]["group_id"] == "gemma2-tiny"
    assert len(result["continuations"]) == 2
    assert all(len(c["token_ids"]) == 3 for c in result["continuations"])


def test_chat_messages_are_accepted(api: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Hello there, how are you?"}]}
    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze", json={**body, "options": {"temperature": 0}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["rows"]


# --- errors ------------------------------------------------------------------------------------


def test_unknown_lens_is_404_naming_the_list_endpoint(api: httpx.Client) -> None:
    error = _error(_analyze(api, "no-such-lens"), 404, "unknown_lens")
    assert "/api/v2/lenses" in error["message"]
    assert error["detail"]["lens_id"] == "no-such-lens"
    _error(api.get("/api/v2/lenses/no-such-lens"), 404, "unknown_lens")


@pytest.mark.parametrize(
    "lens_path",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "..",
        "qwen2-tiny-l1%2F..%2Fqwen2-tiny-l1",
        "lenses%5Cqwen2-tiny-l1",
        "%00",
    ],
)
def test_path_like_lens_ids_are_404(api: httpx.Client, lens_path: str) -> None:
    resp = api.post(
        f"/api/v2/lenses/{lens_path}/analyze", json={"text": TEXT}, follow_redirects=False
    )
    assert resp.status_code == 404, (lens_path, resp.status_code, resp.text)
    assert set(resp.json()["error"]) == {"code", "message", "detail"}


def test_unknown_group_and_route_are_404_in_the_error_shape(api: httpx.Client) -> None:
    _error(api.get("/api/v2/groups/no-such-group/status"), 404, "unknown_group")
    _error(api.post("/api/v2/groups/no-such-group/preload"), 404, "unknown_group")
    _error(api.get("/api/v2/nothing-here"), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"text": TEXT, "options": {"temperature": 2.5}},
        {"text": TEXT, "options": {"temperature": -0.1}},
        {"text": TEXT, "options": {"best_of_k": 0}},
        {"text": TEXT, "options": {"best_of_k": 65}},
        {"text": TEXT, "options": {"batch_size": 0}},
        {"text": TEXT, "options": {"batch_size": 513}},
        {"text": TEXT, "options": {"positions": [-1]}},
        {"text": TEXT, "options": {"seed": -1}},
        {"text": TEXT, "options": {"no_such_option": 1}},
        {"text": TEXT, "unexpected": True},
        {"text": TEXT, "messages": [{"role": "user", "content": "hi"}]},
        {"options": {}},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"text": 5},
    ],
)
def test_bad_bodies_are_422_not_clamped(api: httpx.Client, body: dict) -> None:
    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze", json=body)
    error = _error(resp, 422, "bad_input")
    assert error["detail"]["problems"], error


def test_text_of_under_two_tokens_is_422_from_the_replica(api: httpx.Client) -> None:
    # The demo tokenizer adds BOS, so "" is one token: lenscore raises BadInput in the replica.
    error = _error(_analyze(api, QWEN, text=""), 422, "bad_input")
    assert "Traceback" not in error["message"]


def test_unpaired_surrogates_are_422_not_500(api: httpx.Client) -> None:
    # Valid JSON (the escape \ud800 is legal) that no tokenizer can encode.
    raw = b'{"text": "a\\ud800b c d"}'
    for route in ("analyze", "generate"):
        resp = api.post(
            f"/api/v2/lenses/{QWEN}/{route}",
            content=raw,
            headers={"Content-Type": "application/json"},
        )
        error = _error(resp, 422, "bad_input")
        assert "unpaired surrogate" in error["message"]


def test_text_too_long_is_413(api: httpx.Client) -> None:
    error = _error(_analyze(api, QWEN, text="x" * (MAX_TEXT_LENGTH + 1)), 413, "text_too_long")
    assert error["detail"]["max_text_length"] == MAX_TEXT_LENGTH
    messages = [{"role": "user", "content": "y" * (MAX_TEXT_LENGTH // 2 + 1)}] * 2
    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze", json={"messages": messages})
    _error(resp, 413, "text_too_long")


def test_a_huge_body_is_413_before_it_is_parsed(api: httpx.Client) -> None:
    huge = b'{"text": "' + b"z" * (2 << 20) + b'"}'
    resp = api.post(
        f"/api/v2/lenses/{QWEN}/analyze",
        content=huge,
        headers={"Content-Type": "application/json"},
    )
    error = _error(resp, 413, "text_too_long")
    assert error["detail"]["body_bytes"] == len(huge)


def test_malformed_json_is_400_in_the_error_shape(api: httpx.Client) -> None:
    resp = api.post(
        f"/api/v2/lenses/{QWEN}/analyze",
        content=b'{"text": "abc", ',
        headers={"Content-Type": "application/json"},
    )
    _error(resp, 400, "malformed_json")


# --- streaming, preload, websocket ------------------------------------------------------------


def test_ndjson_stream_gives_progress_then_meta_then_rows(api: httpx.Client) -> None:
    body = {"text": TEXT, "options": {"temperature": 0, "batch_size": 2}}
    with api.stream("POST", f"/api/v2/lenses/{QWEN}/analyze?stream=true", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp.iter_lines() if line]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "progress", kinds
    first_meta = kinds.index("meta")
    assert set(kinds[:first_meta]) == {"progress"}
    assert kinds[-1] == "done"
    rows = [event["row"] for event in events if event["event"] == "row"]
    assert set(kinds[first_meta + 1 : -1]) == {"row"}
    assert events[first_meta]["meta"]["lens_id"] == QWEN
    progress = [event for event in events if event["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == len(rows)
    # The stream's rows are the JSON result's rows.
    assert rows == _analyze(api, QWEN, batch_size=2).json()["rows"]


def test_stream_flag_in_the_body_streams_too(api: httpx.Client) -> None:
    body = {"text": TEXT, "stream": True, "options": {"temperature": 0}}
    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze", json=body)
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert json.loads(resp.text.splitlines()[-1]) == {"event": "done"}


def test_stream_error_before_the_first_event_keeps_its_status(api: httpx.Client) -> None:
    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze?stream=true", json={"text": ""})
    _error(resp, 422, "bad_input")


def test_closing_a_stream_leaves_no_request_in_flight(api: httpx.Client, wait_until: Any) -> None:
    body = {"text": TEXT * 20, "options": {"temperature": 0, "batch_size": 1}}
    with api.stream("POST", f"/api/v2/lenses/{QWEN}/analyze?stream=true", json=body) as resp:
        first = json.loads(next(resp.iter_lines()))
        assert first["event"] == "progress"
    # The client went away after one event: the replica's generator must be closed.

    def idle() -> bool:
        replicas = api.get("/api/v2/groups/qwen2-tiny/status").json()["replicas"]
        return bool(replicas) and all(replica["in_flight"] == 0 for replica in replicas)

    wait_until(idle, timeout_s=60, what="qwen2-tiny replicas idle")


def test_sse_preload_sends_one_event_per_lens(api: httpx.Client) -> None:
    lens_ids = ["qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"]
    headers = {"Accept": "text/event-stream"}
    with api.stream(
        "POST", "/api/v2/groups/qwen2-tiny/preload", json={"lens_ids": lens_ids}, headers=headers
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    lens_events = [data for kind, data in events if kind == "lens"]
    assert sorted(e["lens_id"] for e in lens_events) == sorted(lens_ids)
    assert all(e["ok"] for e in lens_events), lens_events
    assert events[-1][0] == "done"
    assert len(events) == len(lens_ids) + 1


def test_json_preload_of_a_whole_group(api: httpx.Client) -> None:
    resp = api.post("/api/v2/groups/gemma2-tiny/preload")
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["group_id"] == "gemma2-tiny"
    assert [r["lens_id"] for r in result["results"]] == [
        "gemma2-tiny-l1",
        "gemma2-tiny-l2-input",
        "gemma2-tiny-l0-first1",
    ]
    assert all(r["ok"] and r["replica_id"] for r in result["results"]), result


def test_preload_of_a_lens_from_another_group_is_404(api: httpx.Client) -> None:
    resp = api.post("/api/v2/groups/gemma2-tiny/preload", json={"lens_ids": [QWEN]})
    _error(resp, 404, "unknown_lens")


def test_websocket_analyze_round_trip(api: httpx.Client, ray_cluster: Any) -> None:
    from websockets.sync.client import connect

    url = ray_cluster.http_url.replace("http://", "ws://") + "/api/v2/ws"
    with connect(url, open_timeout=30) as socket:
        socket.send(json.dumps({"type": "analyze", "id": "a1", "lens_id": QWEN, "text": TEXT,
                                "options": {"temperature": 0, "batch_size": 2}}))  # fmt: skip
        messages = []
        while not messages or messages[-1]["type"] not in ("result", "error"):
            messages.append(json.loads(socket.recv(timeout=120)))
        assert {m["id"] for m in messages} == {"a1"}
        assert messages[0]["type"] == "progress"
        assert messages[-1]["type"] == "result", messages[-1]
        result = messages[-1]["result"]
        assert result["rows"] == _analyze(api, QWEN, batch_size=2).json()["rows"]

        socket.send(json.dumps({"type": "analyze", "id": 2, "lens_id": "nope", "text": TEXT}))
        error = json.loads(socket.recv(timeout=60))
        assert error["type"] == "error" and error["id"] == 2
        assert error["status"] == 404 and error["error"]["code"] == "unknown_lens"

        socket.send("{not json")
        error = json.loads(socket.recv(timeout=60))
        assert error["type"] == "error" and error["error"]["code"] == "malformed_json"

        socket.send(json.dumps({"type": "preload", "id": "p", "group_id": "qwen2-tiny",
                                "lens_ids": [QWEN]}))  # fmt: skip
        preload = [json.loads(socket.recv(timeout=120)) for _ in range(2)]
        assert [m["type"] for m in preload] == ["lens", "result"]
        assert preload[0]["item"]["lens_id"] == QWEN and preload[0]["item"]["ok"]

        # A long analysis stopped by a `cancel` message answers `cancelled`, not a result.
        socket.send(json.dumps({"type": "analyze", "id": "long", "lens_id": QWEN,
                                "text": TEXT * 20, "options": {"batch_size": 1}}))  # fmt: skip
        assert json.loads(socket.recv(timeout=120))["type"] == "progress"
        socket.send(json.dumps({"type": "cancel", "id": "long"}))
        while (message := json.loads(socket.recv(timeout=120)))["type"] == "progress":
            pass
        assert message == {"type": "cancelled", "id": "long"}


# --- groups, lenses, status, metrics -----------------------------------------------------------


def test_groups_list_has_the_design_shape(
    api: httpx.Client, demo_manifest: dict, wait_until: Any
) -> None:
    expected_replicas = {"gemma2-tiny": 2, "qwen2-tiny": 1}

    def running(body: dict) -> dict[str, int]:
        # The scale-to-zero group has 0 or 1 replicas depending on the tests run before.
        return {
            g["group_id"]: g["replicas_running"]
            for g in body["groups"]
            if g["group_id"] != COLD_GROUP
        }

    def listing_with_every_replica() -> dict | None:
        # Replicas report to the registry on start and on each health check.
        body = api.get("/api/v2/groups").json()
        return body if running(body) == expected_replicas else None

    body = wait_until(listing_with_every_replica, timeout_s=60, what="every replica listed")
    assert sorted(g["group_id"] for g in body["groups"]) == GROUP_IDS
    for group in body["groups"]:
        assert {
            "group_id", "name", "description", "base_model", "memory_estimate",
            "estimated_switch_seconds", "replicas_running", "lenses",
        } <= set(group)  # fmt: skip
        memory = group["memory_estimate"]
        assert set(memory) == {"base_bytes", "lens_bytes_total", "donor_bytes"}
        assert memory["base_bytes"] > 0 and memory["lens_bytes_total"] > 0
        switch = group["estimated_switch_seconds"]
        assert set(switch) == {"host", "disk", "cold", "source", "sources"}
        assert switch["source"] in ("measured", "estimated")
        for lens in group["lenses"]:
            assert set(lens) == {
                "lens_id", "name", "layer", "t_text", "donor", "bytes", "visible", "residency",
                "status", "reason",
            }  # fmt: skip
            assert lens["status"] == "available" and lens["reason"] is None, lens
            entry = demo_manifest["lenses"][lens["lens_id"].replace(COLD_GROUP, "qwen2-tiny")]
            assert entry["base"] == group["group_id"].replace(COLD_GROUP, "qwen2-tiny")
            assert (lens["layer"], lens["t_text"], lens["donor"]) == (
                entry["layer"],
                entry["t_text"],
                entry["donor"],
            )
            assert lens["bytes"] > 0
            for place in lens["residency"]:
                assert set(place) == {"replica_id", "tier"}
                assert place["tier"] in ("device", "host")
    qwen = next(g for g in body["groups"] if g["group_id"] == "qwen2-tiny")
    assert qwen["memory_estimate"]["donor_bytes"] > 0


def test_a_used_lens_shows_residency(api: httpx.Client, wait_until: Any) -> None:
    assert _analyze(api, QWEN).status_code == 200
    lens = api.get(f"/api/v2/lenses/{QWEN}").json()
    assert lens["group_id"] == "qwen2-tiny"
    assert lens["sizes"]["lens_bytes"] == lens["bytes"] > 0
    assert lens["sizes"]["checkpoint_file_bytes"] >= lens["bytes"]
    assert lens["problem"] is None
    # Replicas push their snapshots to the registry after each change: poll for it.
    residency = wait_until(
        lambda: api.get(f"/api/v2/lenses/{QWEN}").json()["residency"],
        timeout_s=30,
        what=f"{QWEN} resident somewhere",
    )
    assert residency[0]["tier"] in ("device", "host")


def test_lens_list_names_every_lens(api: httpx.Client, demo_manifest: dict) -> None:
    lenses = api.get("/api/v2/lenses").json()["lenses"]
    assert sorted(lens["lens_id"] for lens in lenses) == sorted(
        [*demo_manifest["lenses"], COLD_LENS]
    )


def test_group_status_lists_every_replica(api: httpx.Client, wait_until: Any) -> None:
    def two_replicas() -> list[dict] | None:
        status = api.get("/api/v2/groups/gemma2-tiny/status").json()
        return status["replicas"] if len(status["replicas"]) == 2 else None

    replicas = wait_until(two_replicas, timeout_s=60, what="2 gemma replicas in status")
    assert len({r["replica_id"] for r in replicas}) == 2
    for replica in replicas:
        assert {"replica_id", "device", "memory", "base_loads", "lenses", "donors",
                "in_flight", "switches"} <= set(replica)  # fmt: skip
        assert set(replica["memory"]) >= {
            "base_bytes", "lens_bytes", "donor_bytes", "allocated_bytes", "free_bytes",
            "total_bytes",
        }  # fmt: skip
        assert set(replica["lenses"]) >= {"device", "host", "failed"}
        assert replica["base_loads"] == 1


def test_router_metrics_are_prometheus_text(api: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api.get("/api/v2/groups")
    resp = api.get("/metrics")
    assert resp.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    samples = families["lens_router_requests"].samples
    assert any(s.labels["endpoint"] == "/api/v2/groups" for s in samples), samples


def test_openapi_documents_every_v2_route(api: httpx.Client) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v2/groups",
        "/api/v2/groups/{group_id}/status",
        "/api/v2/groups/{group_id}/preload",
        "/api/v2/lenses/{lens_id}",
        "/api/v2/lenses/{lens_id}/analyze",
        "/api/v2/lenses/{lens_id}/generate",
    ):
        assert path in paths, path
    analyze = paths["/api/v2/lenses/{lens_id}/analyze"]["post"]
    assert "404" in analyze["responses"] and "422" in analyze["responses"]


def test_the_web_page_is_served(api: httpx.Client) -> None:
    resp = api.get("/")
    assert resp.status_code == 200
    assert "text/html" in resp.headers["content-type"]
    assert 'src="static/js/main.js"' in resp.text
    script = api.get("/static/js/main.js")
    assert script.status_code == 200, script.text
    assert "javascript" in script.headers["content-type"]
    assert api.get("/static/../deployments/app.py").status_code == 404


def test_a_group_scaled_to_zero_starts_on_request_and_counts_a_cold_start(
    api: httpx.Client,
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def cold_starts() -> float:
        families = text_string_to_metric_families(api.get("/metrics").text)
        family = next((f for f in families if f.name == "lens_cold_start_seconds"), None)
        samples = family.samples if family else []
        return sum(
            s.value
            for s in samples
            if s.name.endswith("_count") and s.labels.get("group") == COLD_GROUP
        )

    groups = {g["group_id"]: g for g in api.get("/api/v2/groups").json()["groups"]}
    assert groups[COLD_GROUP]["replicas_running"] == 0
    assert groups[COLD_GROUP]["estimated_switch_seconds"]["source"] == "estimated"
    assert cold_starts() == 0
    resp = _analyze(api, COLD_LENS)
    assert resp.status_code == 200, resp.text
    cold = resp.json()
    assert cold["meta"]["group_id"] == COLD_GROUP
    # Same checkpoint and base as qwen2-tiny-l1: the same greedy explanations.
    warm = _analyze(api, QWEN).json()
    assert [r["explanation_token_ids"] for r in cold["rows"]] == [
        r["explanation_token_ids"] for r in warm["rows"]
    ]
    assert cold_starts() >= 1
    groups = {g["group_id"]: g for g in api.get("/api/v2/groups").json()["groups"]}
    switch = groups[COLD_GROUP]["estimated_switch_seconds"]
    assert switch["source"] == "measured" and switch["cold"] > 0


def test_a_full_queue_is_503_overloaded_with_retry_after(api: httpx.Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    assert _analyze(api, COLD_LENS).status_code == 200  # the replica is up
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(
            pool.map(lambda _: _analyze(api, COLD_LENS, text=TEXT * 3, batch_size=1), range(6))
        )
    statuses = sorted(resp.status_code for resp in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for resp in responses:
        if resp.status_code == 503:
            _error(resp, 503, "overloaded")
            assert int(resp.headers["Retry-After"]) >= 1


# --- auth on -----------------------------------------------------------------------------------


def test_auth_refuses_requests_without_the_key(secure: httpx.Client) -> None:
    _error(secure.get("/api/v2/groups"), 401, "unauthorized")
    wrong = {"Authorization": "Bearer wrong-key"}
    _error(secure.get("/api/v2/groups", headers=wrong), 401, "unauthorized")
    _error(secure.post(f"/api/v2/lenses/{QWEN}/analyze", json={"text": TEXT}), 401)
    _error(secure.get("/metrics"), 401, "unauthorized")
    # Health stays open.
    assert secure.get("/healthz").status_code == 200
    assert secure.get("/readyz").status_code == 200


def test_auth_accepts_the_key(secure: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    resp = secure.get("/api/v2/groups", headers=headers)
    assert resp.status_code == 200, resp.text
    assert [g["group_id"] for g in resp.json()["groups"]] == ["qwen2-tiny"]
    assert resp.headers.get("access-control-allow-origin") is None  # no Origin sent


def test_websocket_upgrade_without_the_key_is_refused(
    secure: httpx.Client, ray_cluster: Any
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = ray_cluster.http_url.replace("http://", "ws://") + AUTH_PREFIX + "/api/v2/ws"
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, open_timeout=30) as socket:
            socket.recv(timeout=10)
    assert refused.value.response.status_code in (401, 403)
    with connect(f"{url}?api_key={API_KEY}", open_timeout=30) as socket:
        socket.send(json.dumps({"type": "analyze", "id": 1, "lens_id": "nope", "text": TEXT}))
        assert json.loads(socket.recv(timeout=60))["error"]["code"] == "unknown_lens"


def test_openapi_follows_the_api_key_setting(api: httpx.Client, secure: httpx.Client) -> None:
    assert api.get("/openapi.json").status_code == 200  # keys off: public
    assert api.get("/docs").status_code == 200
    _error(secure.get("/openapi.json"), 401, "unauthorized")
    _error(secure.get("/docs"), 401, "unauthorized")
    keyed = secure.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 200, keyed.text
    assert "/api/v2/lenses/{lens_id}/analyze" in keyed.json()["paths"]


def test_websocket_from_another_site_is_refused(api: httpx.Client, ray_cluster: Any) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = ray_cluster.http_url.replace("http://", "ws://") + "/api/v2/ws"
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, origin="http://evil.example", open_timeout=30) as socket:
            socket.recv(timeout=10)
    assert refused.value.response.status_code == 403
    own = ray_cluster.http_url  # the page lens-serve serves itself
    with connect(url, origin=own, open_timeout=30) as socket:
        socket.send(json.dumps({"type": "analyze", "id": 1, "lens_id": "nope", "text": TEXT}))
        assert json.loads(socket.recv(timeout=60))["error"]["code"] == "unknown_lens"


def test_a_cross_site_page_cannot_change_state_without_a_preflight(
    api: httpx.Client, secure: httpx.Client, ray_cluster: Any
) -> None:
    # A form or a text/plain fetch needs no preflight: the browser sends it and only hides
    # the answer. Without the Origin check these would cancel jobs or load a whole group.
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    for path in ("/reset", "/api/v2/groups/qwen2-tiny/preload"):
        error = _error(api.post(path, headers=evil), 403, "origin_not_allowed")
        assert error["detail"] == {"origin": "http://evil.example"}
    _error(api.delete("/api/v2/jobs/abc", headers=evil), 403, "origin_not_allowed")
    assert api.get("/api/v2/groups", headers=evil).status_code == 200  # reads pass
    # The server's own page, clients that send no Origin, and a listed origin may.
    assert api.post("/reset", headers={"Origin": ray_cluster.http_url}).status_code == 200
    assert api.post("/reset").status_code == 200
    listed = {"Origin": ALLOWED_ORIGIN, "Authorization": f"Bearer {API_KEY}"}
    assert secure.post("/reset", headers=listed).status_code == 200


def test_without_keys_a_rebound_host_name_is_refused(
    api: httpx.Client, secure: httpx.Client, ray_cluster: Any
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    # DNS rebinding: the page's own name now points here, so Origin and Host agree.
    rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
    error = _error(api.get("/api/v2/groups", headers=rebound), 403, "host_not_allowed")
    assert error["detail"] == {"host": "evil.example:8000"}
    _error(api.post("/reset", headers=rebound), 403, "host_not_allowed")
    _error(api.get("/", headers=rebound), 403, "host_not_allowed")
    url = ray_cluster.http_url.replace("http://", "ws://") + "/api/v2/ws"
    with pytest.raises(InvalidStatus) as refused:  # no Origin: only the host check refuses
        with connect(url, additional_headers={"Host": "evil.example:8000"}, open_timeout=30):
            pass
    assert refused.value.response.status_code == 403
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert api.get("/api/v2/groups", headers={"Host": host}).status_code == 200, host
    # With keys on, a rebound page has no key to send: every host name passes the check.
    keyed = {"Host": "lens.example.org", "Authorization": f"Bearer {API_KEY}"}
    assert secure.get("/api/v2/groups", headers=keyed).status_code == 200


def test_the_page_may_not_be_framed_and_runs_only_its_own_scripts(api: httpx.Client) -> None:
    page = api.get("/")
    assert page.status_code == 200
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["content-security-policy"].split(";")
    )
    assert policy["frame-ancestors"] == "'none'"
    assert policy["script-src"].startswith("'self' 'sha256-")  # the page's one inline script
    assert "unsafe-inline" not in policy["script-src"]
    for resp in (page, api.get("/api/v2/groups"), api.get("/nope")):
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"


def test_a_chunked_body_over_the_limit_is_413(api: httpx.Client) -> None:
    chunk = b" " * 65536

    def body() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(40):  # 2.6 MB, over 8 bytes x 20,000 chars + 1 MiB
            yield chunk
        yield b'"}'

    resp = api.post(f"/api/v2/lenses/{QWEN}/analyze", content=body(),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert "content-length" not in resp.request.headers
    _error(resp, 413, "text_too_long")


def test_cors_allows_only_the_configured_origins(secure: httpx.Client) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = secure.options("/api/v2/groups", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    refused = secure.options(
        "/api/v2/groups", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in refused.headers


def test_rate_limit_answers_429_with_retry_after(secure: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    statuses = []
    for _ in range(AUTH_RATE_PER_MINUTE + 2):
        resp = secure.get(f"/api/v2/lenses/{QWEN}", headers=headers)
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            error = _error(resp, 429, "rate_limited")
            assert int(resp.headers["Retry-After"]) >= 1
            assert error["detail"]["retry_after_seconds"] > 0
            break
    assert 429 in statuses, statuses
