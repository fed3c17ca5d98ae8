"""The `ray_lens_*` metrics on Ray's metrics export port, read by prometheus_client and Prometheus.

One application for the module, with group ids no other module uses, so no other traffic on
the session's shared Ray carries their `group` tag. A scripted sequence runs once through
Serve's HTTP proxy; each test checks what Ray exported for it (DESIGN §Metrics). Ray exports
on its report interval (about 10 s): tests poll against a deadline, never sleep. Over 400
lines because every test reads the one scripted run, which takes a replica start per group.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deployments.conftest import free_port

APP = "lens-serve-metrics"
ROUTE = "/metrics-test"
GROUP = "metrics-qwen2"
TEXT = "The quick brown fox jumps over the lazy dog."
OPTIONS = {"temperature": 0.0, "seed": 0, "calculate_salience": False}
A, B, C = "qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"
# A second group that scales to zero: its first request waits for a replica (a cold start);
# then a donor lens (a donor load) and a lens whose checkpoint is truncated once the app runs
# (a load failure), so every series the dashboard and the alerts name gets exported.
COLD_GROUP = "metrics-cold"
COLD_LENS = "metrics-cold-l1"  # the checkpoint of A
DONOR_LENS = "metrics-cold-donor"  # the checkpoint of qwen2-tiny-l1-donor
CORRUPT_LENS = "metrics-cold-corrupt"
ANALYZE = "/api/v2/lenses/{lens_id}/analyze"
GROUPS = "/api/v2/groups"
# Two lenses fit the device. A (first load), B (disk), C (disk: A goes to the host tier),
# A again (host: B goes to the host tier), then A twice more (hits).
SEQUENCE = [A, B, C, A, A, A]
EXPECTED_KINDS = ["first", "disk", "disk", "host", "hit", "hit"]
EXPECTED_SWITCHES = {"first": 1.0, "disk": 2.0, "host": 1.0, "hit": 2.0}
EXPECTED_LOADS = {"disk": 3.0, "host": 1.0}  # the first load reads from disk too
EXPECTED_RESIDENT = {"device": 2.0, "host": 1.0}  # device [C, A], host [B]
MEMORY_KINDS = {"base", "lenses", "donors", "allocated", "free", "total"}

# DESIGN §Metrics: our tags per exported series (histograms by their `_count` series).
DESIGN_TAGS = {
    "ray_lens_switch_seconds_count": {"group", "kind"},
    "ray_lens_load_seconds_count": {"group", "source"},
    "ray_lens_base_load_seconds_count": {"group"},
    "ray_lens_cold_start_seconds_count": {"group"},
    "ray_lens_resident_lenses": {"group", "tier"},
    "ray_lens_device_memory_bytes": {"group", "kind"},
    "ray_lens_requests_total": {"group", "endpoint", "status"},
    "ray_lens_analyze_seconds_count": {"group"},
    "ray_lens_analyzed_tokens_total": {"group"},
    "ray_lens_donor_load_seconds_count": {"group"},
    # DESIGN allows a `lens` tag on counters (lens ids are bounded by the config).
    "ray_lens_load_failures_total": {"group", "reason", "lens"},
}
# Tags Serve adds to every `ray.serve.metrics` metric, and the ones Ray's exporter adds
# (Ray 2.60 exports through OpenTelemetry, hence the `otel_scope_*` ones).
SERVE_TAGS = {"application", "deployment", "replica"}
RAY_TAGS = SERVE_TAGS | {
    "route", "SessionName", "Version", "Component", "NodeAddress", "WorkerId", "JobId",
    "otel_scope_name", "otel_scope_schema_url", "otel_scope_version",
}  # fmt: skip

Sample = tuple[str, dict[str, str], float]


@dataclass
class Traffic:
    """What the scripted sequence did and saw."""

    client: httpx.Client
    switch_kinds: list[str] = field(default_factory=list)
    analyzed_tokens: int = 0
    estimate_before: dict[str, Any] = field(default_factory=dict)
    # (group tag, endpoint template, status) of every request sent but `/readyz`.
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def send(self, method: str, path: str, template: str, group: str, **kw: Any) -> Any:
        response = self.client.request(method, path, **kw)
        self.requests[(group, template, str(response.status_code))] += 1
        return response

    def groups(self) -> dict[str, dict[str, Any]]:
        response = self.send("GET", GROUPS, GROUPS, "")
        assert response.status_code == 200, response.text
        return {g["group_id"]: g for g in response.json()["groups"]}


@dataclass(frozen=True)
class Groups:
    """The module's group files and the checkpoint file its test truncates."""

    groups_dir: Path
    corrupt_file: Path


def write_groups_for_module(write_groups: Callable[..., Path], tmp_path: Path) -> Groups:
    """GROUP: the demo qwen2 group without its donor lens (no donor load); COLD_GROUP."""
    groups_dir = write_groups(("qwen2-tiny",))
    demo_file = groups_dir / "qwen2-tiny.yaml"
    data = yaml.safe_load(demo_file.read_text())
    demo_file.unlink()
    lenses = {lens["id"]: lens for lens in data["lenses"]}
    group = data | {"group_id": GROUP, "donors": [], "lenses": [lenses[i] for i in (A, B, C)]}
    assert group["replica"]["max_lenses_per_replica"] == 2
    (groups_dir / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    # An intact copy at start-up (start-up refuses a corrupt checkpoint), truncated later.
    newest = max(Path(lenses[C]["checkpoint"]).glob("checkpoint_step*.pt"))
    corrupt_file = tmp_path / newest.name
    shutil.copy(newest, corrupt_file)
    cold_lenses = [
        lenses[A] | {"id": COLD_LENS},
        lenses["qwen2-tiny-l1-donor"] | {"id": DONOR_LENS},
        lenses[C] | {"id": CORRUPT_LENS, "checkpoint": str(corrupt_file)},
    ]
    cold = data | {"group_id": COLD_GROUP, "lenses": cold_lenses}
    cold["replica"] = data["replica"] | {"autoscaling": {"min_replicas": 0, "max_replicas": 1}}
    (groups_dir / f"{COLD_GROUP}.yaml").write_text(yaml.safe_dump(cold, sort_keys=False))
    return Groups(groups_dir, corrupt_file)


def is_ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def traffic(
    ray_cluster: Any, write_groups: Any, wait_until: Any, tmp_path_factory: Any
) -> Iterator[Traffic]:
    """Deploy the app, run SEQUENCE on GROUP, then COLD_GROUP's requests, all over HTTP."""
    from ray import serve

    from deployments.app import build_app

    groups = write_groups_for_module(write_groups, tmp_path_factory.mktemp("corrupt"))
    serve.run(build_app({"groups_dir": str(groups.groups_dir)}), name=APP, route_prefix=ROUTE,
              blocking=False)  # fmt: skip
    with httpx.Client(base_url=ray_cluster.http_url + ROUTE, timeout=120) as client:
        wait_until(lambda: is_ready(client), timeout_s=300, what=f"{APP} ready")
        seen = Traffic(client)
        # Until the replica has reported to the registry, the router would take the group
        # for one with no replica and count a cold start: wait for the report.
        group = wait_until(
            lambda: (g := seen.groups()[GROUP])["replicas_running"] == 1 and g,
            timeout_s=120,
            what=f"{GROUP} replica in the groups list",
        )
        seen.estimate_before = group["estimated_switch_seconds"]
        for lens_id in SEQUENCE:
            path = ANALYZE.format(lens_id=lens_id)
            body = {"text": TEXT, "options": OPTIONS}
            response = seen.send("POST", path, ANALYZE, GROUP, json=body)
            assert response.status_code == 200, response.text
            result = response.json()
            seen.switch_kinds.append(result["meta"]["switch"]["kind"])
            seen.analyzed_tokens += len(result["rows"])
        # Refused at the router: no switch, but counted per endpoint and status.
        missing = seen.send("POST", ANALYZE.format(lens_id="no-such-lens"), ANALYZE, "",
                            json={"text": TEXT})  # fmt: skip
        assert missing.status_code == 404, missing.text
        invalid = seen.send("POST", ANALYZE.format(lens_id=A), ANALYZE, GROUP, json={"text": 5})
        assert invalid.status_code == 422, invalid.text
        for lens_id in (COLD_LENS, DONOR_LENS):
            response = seen.send("POST", ANALYZE.format(lens_id=lens_id), ANALYZE, COLD_GROUP,
                                 json={"text": TEXT, "options": OPTIONS})  # fmt: skip
            assert response.status_code == 200, response.text
        data = groups.corrupt_file.read_bytes()
        groups.corrupt_file.write_bytes(data[: len(data) // 3])
        corrupt = seen.send("POST", ANALYZE.format(lens_id=CORRUPT_LENS), ANALYZE, COLD_GROUP,
                            json={"text": TEXT, "options": OPTIONS})  # fmt: skip
        assert corrupt.status_code == 409, corrupt.text
        yield seen
    serve.delete(APP)


def scrape(port: int) -> list[Sample]:
    """Every sample of Ray's metrics endpoint as (sample name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def ours(samples: list[Sample], name: str) -> list[Sample]:
    """Samples of one exported series from this module's application."""
    return [s for s in samples if s[0] == name and s[1].get("application") == APP]


def by_tag(samples: list[Sample], name: str, tag: str) -> dict[str, float]:
    """Sum the GROUP samples of `name` per value of `tag`."""
    sums: dict[str, float] = {}
    for _, labels, value in ours(samples, name):
        if labels.get("group") == GROUP:
            sums[labels[tag]] = sums.get(labels[tag], 0.0) + value
    return sums


def cold_starts(samples: list[Sample]) -> dict[str, float]:
    """`ray_lens_cold_start_seconds_count` of this application by group."""
    return {s[1]["group"]: s[2] for s in ours(samples, "ray_lens_cold_start_seconds_count")}


def exported_requests(samples: list[Sample]) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for _, labels, value in ours(samples, "ray_lens_requests_total"):
        if labels["endpoint"] != "/readyz":
            counts[(labels["group"], labels["endpoint"], labels["status"])] += int(value)
    return counts


def wait_for_export(
    port: int,
    check: Callable[[list[Sample]], bool],
    what: str,
    wait_until: Any,
    explain: Callable[[list[Sample]], Any] | None = None,
) -> list[Sample]:
    """Scrape until `check` holds; on timeout show `explain` (or GROUP's samples) of the last."""
    last: list[list[Sample]] = [[]]

    def probe() -> list[Sample] | None:
        last[0] = scrape(port)
        return last[0] if check(last[0]) else None

    try:
        return wait_until(probe, timeout_s=120, what=what)
    except pytest.fail.Exception:
        if explain is not None:
            pytest.fail(f"{what}; last scrape: {explain(last[0])}")
        mine = [s for s in last[0] if s[0].startswith("ray_lens_") and s[1].get("group") == GROUP]
        pytest.fail(f"{what}; last scrape of group {GROUP}: {mine}")


def test_each_scripted_request_reports_the_expected_switch_kind(traffic: Traffic) -> None:
    assert traffic.switch_kinds == EXPECTED_KINDS


def test_exported_switch_and_load_counts_are_exact(
    traffic: Traffic, ray_cluster: Any, wait_until: Any
) -> None:
    expected = {
        "switches": EXPECTED_SWITCHES,
        "loads": EXPECTED_LOADS,
        "analyses": {GROUP: float(len(SEQUENCE))},
        "tokens": {GROUP: float(traffic.analyzed_tokens)},
        # GROUP had its replica all along; COLD_GROUP's first request waited for one.
        "cold_starts": {COLD_GROUP: 1.0},
        "failures": {"corrupt": 1.0},
    }

    def counts(samples: list[Sample]) -> dict[str, dict[str, float]]:
        return {
            "switches": by_tag(samples, "ray_lens_switch_seconds_count", "kind"),
            "loads": by_tag(samples, "ray_lens_load_seconds_count", "source"),
            "analyses": by_tag(samples, "ray_lens_analyze_seconds_count", "group"),
            "tokens": by_tag(samples, "ray_lens_analyzed_tokens_total", "group"),
            "cold_starts": cold_starts(samples),
            "failures": {
                s[1]["reason"]: s[2]
                for s in ours(samples, "ray_lens_load_failures_total")
                if s[1]["lens"] == CORRUPT_LENS
            },
        }

    samples = wait_for_export(
        ray_cluster.metrics_port, lambda samples: counts(samples) == expected,
        f"exported counts {expected}", wait_until,
    )  # fmt: skip
    assert by_tag(samples, "ray_lens_base_load_seconds_count", "group") == {GROUP: 1.0}
    # Each histogram's `+Inf` bucket equals its count.
    buckets = [s for s in ours(samples, "ray_lens_switch_seconds_bucket") if s[1]["le"] == "+Inf"]
    assert {s[1]["kind"]: s[2] for s in buckets if s[1]["group"] == GROUP} == EXPECTED_SWITCHES


def test_exported_request_counts_match_every_request_by_endpoint_and_status(
    traffic: Traffic, ray_cluster: Any, wait_until: Any
) -> None:
    samples = wait_for_export(
        ray_cluster.metrics_port,
        lambda samples: exported_requests(samples) == traffic.requests,
        f"requests {dict(traffic.requests)}",
        wait_until,
    )
    assert traffic.requests[(GROUP, ANALYZE, "200")] == len(SEQUENCE)
    # The readiness polls before the script: at least the one that answered 200, no group.
    readyz = [s for s in ours(samples, "ray_lens_requests_total") if s[1]["endpoint"] == "/readyz"]
    assert any(s[1]["status"] == "200" and s[1]["group"] == "" for s in readyz), readyz


def test_gauges_report_residency_and_memory_by_kind(
    traffic: Traffic, ray_cluster: Any, wait_until: Any
) -> None:
    samples = wait_for_export(
        ray_cluster.metrics_port,
        lambda samples: by_tag(samples, "ray_lens_resident_lenses", "tier") == EXPECTED_RESIDENT,
        f"resident lenses {EXPECTED_RESIDENT}",
        wait_until,
    )
    memory = by_tag(samples, "ray_lens_device_memory_bytes", "kind")
    assert set(memory) == MEMORY_KINDS, memory
    assert memory["base"] > 0 and memory["lenses"] > 0 and memory["donors"] == 0, memory
    assert memory["total"] >= memory["free"] > 0, memory
    status = traffic.send("GET", f"{GROUPS}/{GROUP}/status", f"{GROUPS}/{{group_id}}/status", GROUP)
    assert status.status_code == 200, status.text
    (replica,) = status.json()["replicas"]
    assert memory["base"] == replica["memory"]["base_bytes"]
    assert memory["lenses"] == replica["memory"]["lens_bytes"], replica


def test_exported_tag_sets_are_the_design_ones(
    traffic: Traffic, ray_cluster: Any, wait_until: Any
) -> None:
    samples = wait_for_export(
        ray_cluster.metrics_port,
        lambda samples: all(ours(samples, name) for name in DESIGN_TAGS),
        f"every series of {sorted(DESIGN_TAGS)}",
        wait_until,
    )
    for name, tags in DESIGN_TAGS.items():
        for _, labels, _ in ours(samples, name):
            assert set(labels) - RAY_TAGS == tags, (name, labels)
            assert set(labels) >= SERVE_TAGS, (name, labels)
    # Replicas tag with their own group (deployment name = group id); the router with Ingress.
    router_series = {"ray_lens_requests_total", "ray_lens_cold_start_seconds_count"}
    for name in DESIGN_TAGS:
        for _, labels, _ in ours(samples, name):
            emitter = "Ingress" if name in router_series else labels["group"]
            assert labels["deployment"] == emitter, (name, labels)


def test_groups_list_switch_estimate_turns_measured_after_loads(
    traffic: Traffic, wait_until: Any
) -> None:
    before = traffic.estimate_before
    assert before["source"] == "estimated", before
    assert before["disk"] > 0 and before["host"] > 0 and before["cold"] > 0, before
    after = wait_until(
        lambda: (
            (e := traffic.groups()[GROUP]["estimated_switch_seconds"])["source"] == "measured" and e
        ),
        timeout_s=60,
        what=f"{GROUP} estimate measured",
    )
    assert after["disk"] > 0 and after["host"] > 0, after
    # GROUP never went cold: its cold value stays an estimate, and says so.
    assert after["sources"] == {"host": "measured", "disk": "measured", "cold": "estimated"}


def test_prometheus_scrapes_ray_and_counts_switches_by_kind(
    traffic: Traffic, ray_cluster: Any, wait_until: Any, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian package `prometheus`)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [{"targets": [f"127.0.0.1:{ray_cluster.metrics_port}"]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log_file = tmp_path / "prometheus.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    query = f'sum by (kind) (ray_lens_switch_seconds_count{{group="{GROUP}"}})'

    def counted() -> dict[str, float] | None:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}: {log_file.read_text()}")
        try:
            response = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5
            )
        except httpx.HTTPError:
            return None  # not listening yet
        if response.status_code != 200:
            return None  # starting up ("Service Unavailable" until its storage is ready)
        result = response.json()["data"]["result"]
        counts = {r["metric"]["kind"]: float(r["value"][1]) for r in result}
        return counts if counts == EXPECTED_SWITCHES else None

    try:
        wait_until(counted, timeout_s=120, what=f"prometheus query {query} = {EXPECTED_SWITCHES}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_dashboard_and_alerts_name_only_series_ray_exports(
    traffic: Traffic, ray_cluster: Any, wait_until: Any
) -> None:
    import json
    import re

    k8s = Path(__file__).resolve().parents[2] / "k8s"
    dashboard = json.loads((k8s / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    alerts = yaml.safe_load((k8s / "alerts.yaml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    named = {name for expr in exprs for name in re.findall(r"\bray_[a-z_]+", expr)}
    assert named, "no ray_* series named in the k8s/ queries"

    def missing(samples: list[Sample]) -> set[str]:
        exported = {name for name, _, _ in samples}
        return named - exported

    samples = wait_for_export(
        ray_cluster.metrics_port, lambda samples: not missing(samples),
        f"every series named in k8s/: {sorted(named)}", wait_until,
        explain=lambda samples: f"missing {sorted(missing(samples))}",
    )  # fmt: skip
    assert not missing(samples)
