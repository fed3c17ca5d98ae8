"""k8s/: the RayService against KubeRay's CRD schema, the alert rules and the dashboard."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.ops.k8s import is_stale, render_main, render_text

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD_SCHEMA = REPO / "tests" / "data" / "schemas" / "rayservice.ray.io_v1.schema.json"
DESIGN = REPO / "docs" / "DESIGN.md"

# DESIGN.md §Metrics, by type. Ray exports `ray_<name>`; counters get `_total`, histograms
# `_bucket`, `_sum` and `_count`.
HISTOGRAMS = {
    "lens_switch_seconds",
    "lens_cold_start_seconds",
    "lens_load_seconds",
    "lens_base_load_seconds",
    "lens_donor_load_seconds",
    "lens_analyze_seconds",
}
GAUGES = {"lens_resident_lenses", "lens_device_memory_bytes"}
COUNTERS = {
    "lens_load_failures",
    "lens_requests",
    "lens_analyzed_tokens",
    "lens_activation_cache_lookups",
}
# Ray Serve's multiplexing metrics, which DESIGN keeps on for the cache hit rate.
RAY_SERVE_COUNTERS = {
    "serve_multiplexed_models_load_counter",
    "serve_multiplexed_get_model_requests_counter",
    "serve_multiplexed_models_unload_counter",
}


def exported_names() -> set[str]:
    names = {f"ray_{n}{s}" for n in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    names |= {f"ray_{n}" for n in GAUGES}
    names |= {f"ray_{n}_total" for n in COUNTERS | RAY_SERVE_COUNTERS}
    return names


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(render_text(REPO / "serve_config.yaml", K8S / "cluster.yaml"))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((K8S / "grafana-dashboard.json").read_text())


@pytest.fixture(scope="module")
def alerts() -> dict:
    return yaml.safe_load((K8S / "alerts.yaml").read_text())


def strict(schema: object) -> object:
    """The CRD schema as the API server's strict field validation reads it.

    A structural CRD schema lists every known field; the API server prunes or (with strict
    field validation) rejects the rest. JSON Schema allows unknown keys unless told, so close
    every object that lists properties and does not preserve unknown fields.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator():
    import jsonschema

    schema = strict(json.loads(CRD_SCHEMA.read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def crd_errors(validator, obj: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


# --- RayService --------------------------------------------------------------------------


def test_rendered_rayservice_is_not_stale():
    assert not is_stale(
        REPO / "serve_config.yaml", K8S / "rayservice.yaml", K8S / "cluster.yaml"
    ), "k8s/rayservice.yaml differs from serve_config.yaml + k8s/cluster.yaml: run `make k8s`"


def test_rayservice_validates_against_the_kuberay_crd_schema(crd_validator, rayservice):
    assert crd_errors(crd_validator, rayservice) == []
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayservice["metadata"]["name"])


def test_strict_crd_schema_catches_a_misspelt_field(crd_validator, rayservice):
    broken = copy.deepcopy(rayservice)
    group = broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    errors = crd_errors(crd_validator, broken)
    assert any("maxReplica" in e for e in errors), errors


def test_serve_config_v2_is_serve_config_for_the_cluster(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import AppArgs, ReplicaConfig

    v2 = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2)
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    [app], [local_app] = v2["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local_app[key]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local_app["deployments"]]
    args = AppArgs.model_validate(app["args"])
    assert args.groups_dir.is_absolute()
    assert {k: v for k, v in app["args"].items() if k != "groups_dir"} == {
        k: v for k, v in local_app["args"].items() if k != "groups_dir"
    }
    groups = [d for d in app["deployments"] if d["name"] != "Ingress"]
    assert groups
    for deployment in groups:
        assert deployment["ray_actor_options"]["num_gpus"] == 1
        assert "num_replicas" not in deployment
        assert deployment["autoscaling_config"]["max_replicas"] >= 1
        ReplicaConfig.model_validate(deployment["user_config"])
    # Rarely used groups scale to zero and free their GPU.
    assert any(d["autoscaling_config"]["min_replicas"] == 0 for d in groups)


def test_cluster_shape(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head == {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    [gpu] = gpu_groups
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "template"
    ]["spec"]["tolerations"]


def test_check_mode_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture):
    serve_config = tmp_path / "serve_config.yaml"
    shutil.copy(REPO / "serve_config.yaml", serve_config)
    out = tmp_path / "rayservice.yaml"
    cluster = ["--cluster", str(K8S / "cluster.yaml")]
    assert render_main(["--check", str(serve_config), str(out), *cluster]) == 1
    assert render_main([str(serve_config), str(out), *cluster]) == 0
    assert render_main(["--check", str(serve_config), str(out), *cluster]) == 0
    serve_config.write_text(
        serve_config.read_text().replace("max_text_length: 20000", "max_text_length: 5")
    )
    assert render_main(["--check", str(serve_config), str(out), *cluster]) == 1
    assert "is stale" in capsys.readouterr().err


def test_podmonitor_scrapes_the_ray_metrics_port(rayservice):
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for template in templates:
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == 8080


# --- alerts and dashboard ----------------------------------------------------------------


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def alert_exprs(alerts: dict) -> list[tuple[str, str]]:
    return [(rule["alert"], rule["expr"]) for group in alerts["groups"] for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; .ci/run does)")
    return path


def test_alert_rules_pass_promtool():
    out = subprocess.run(
        [promtool(), "check", "rules", str(K8S / "alerts.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_on_the_series_they_watch():
    # k8s/alerts_test.yaml feeds synthetic series and states which alerts fire, with labels.
    out = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yaml"], cwd=K8S, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_queries_parse_as_promql(tmp_path: Path, dashboard: dict):
    rules = [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_exprs(dashboard))
    ]
    rule_file = tmp_path / "dashboard_rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_cover_slow_switches_load_failures_and_ooms(alerts: dict):
    exprs = " ".join(expr for _, expr in alert_exprs(alerts))
    assert "ray_lens_switch_seconds_bucket" in exprs
    assert "ray_lens_load_failures_total" in exprs
    assert 'reason="oom"' in exprs


def test_dashboard_has_the_operator_panels(dashboard: dict):
    exprs = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    assert "histogram_quantile(0.5, " in exprs and "histogram_quantile(0.95, " in exprs
    assert 'ray_lens_switch_seconds_count{kind="hit"' in exprs
    for name in (
        "ray_lens_cold_start_seconds",
        "ray_lens_device_memory_bytes",
        "ray_lens_requests_total",
    ):
        assert name in exprs, name
    assert all(
        p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "targets" in p
    )


def test_every_metric_named_is_an_exported_metric(dashboard: dict, alerts: dict):
    named = dashboard_exprs(dashboard) + alert_exprs(alerts)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            named.append((variable["name"], variable["definition"]))
    unknown = {
        (where, metric)
        for where, expr in named
        for metric in re.findall(r"\bray_[a-z_]+", expr)
        if metric not in exported_names()
    }
    assert unknown == set()


def test_metric_table_matches_design():
    section = DESIGN.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    declared: dict[str, set[str]] = {"histogram": set(), "gauge": set(), "counter": set()}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(lens_[a-z_]+)`", cells[0])
        kinds = [k.strip() for k in cells[1].split(",")]
        kinds = kinds * len(names) if len(kinds) == 1 else kinds
        for name, kind in zip(names, kinds, strict=True):
            declared[kind].add(name)
    assert declared == {"histogram": HISTOGRAMS, "gauge": GAUGES, "counter": COUNTERS}
