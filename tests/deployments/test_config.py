"""Group files, app args and serve_config.yaml: every rule of DESIGN §Model groups."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from deployments import config
from deployments.checks import validate_groups
from deployments.config import (
    AppArgs,
    GroupConfigError,
    ReplicaConfig,
    ReplicaSpec,
    api_keys_from_env,
)
from deployments.group_files import load_groups

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_groups(tmp_path: Path, demo_dir: Path) -> Path:
    """The repo's demo group files next to a `.demo` link to the session's demo tree."""
    shutil.copytree(REPO / "groups", tmp_path / "groups")
    (tmp_path / ".demo").symlink_to(demo_dir, target_is_directory=True)
    return tmp_path / "groups"


def qwen_group(demo_dir: Path, **changes) -> dict:
    """A valid group dict on the demo qwen2 base, with absolute paths."""
    group = {
        "group_id": "q",
        "name": "Q",
        "base_model": str(demo_dir / "bases/qwen2-tiny"),
        "donors": [{"id": "qwen2-tiny-donor", "path": str(demo_dir / "donors/qwen2-tiny-donor")}],
        "lenses": [
            {
                "id": "q-l1",
                "name": "L1",
                "checkpoint": str(demo_dir / "lenses/qwen2-tiny-l1"),
                "layer": 1,
            }
        ],
    }
    group.update(changes)
    return group


def lens(demo_dir: Path, lens_id: str, source: str, layer: int, **extra) -> dict:
    return {
        "id": lens_id,
        "name": lens_id,
        "checkpoint": str(demo_dir / "lenses" / source),
        "layer": layer,
        **extra,
    }


def write_groups(tmp_path: Path, files: dict[str, object]) -> Path:
    groups_dir = tmp_path / "g"
    groups_dir.mkdir(exist_ok=True)
    for name, data in files.items():
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        (groups_dir / name).write_text(text)
    return groups_dir


def problems_of(groups_dir: Path, check_checkpoints: bool = True) -> list[str]:
    """Every problem: of the files and what they name (validate), or of the files alone."""
    if check_checkpoints:
        problems = validate_groups(groups_dir)
        assert problems, "validate_groups found no problem"
        return problems
    with pytest.raises(GroupConfigError) as info:
        load_groups(groups_dir)
    assert str(info.value).count("\n") == len(info.value.problems)
    return info.value.problems


# --- the demo groups -------------------------------------------------------------------


def test_demo_groups_validate_against_the_demo_tree(demo_groups: Path):
    assert validate_groups(demo_groups) == []


def test_demo_groups_match_the_demo_manifest(demo_groups: Path, demo_manifest: dict):
    groups = {g.group_id: g for g in load_groups(demo_groups)}
    assert set(groups) == {"qwen2-tiny", "gemma2-tiny"}
    served = {x.lens_id: (g.group_id, x) for g in groups.values() for x in g.lenses}
    assert set(served) == set(demo_manifest["lenses"])
    for lens_id, entry in demo_manifest["lenses"].items():
        group_id, spec = served[lens_id]
        assert group_id == entry["base"]
        assert spec.layer == entry["layer"]
        assert spec.donor == entry["donor"]
    assert len(groups["qwen2-tiny"].lenses) >= 3 and len(groups["gemma2-tiny"].lenses) >= 3
    assert [lens.donor for lens in groups["qwen2-tiny"].lenses].count("qwen2-tiny-donor") == 1


def test_demo_groups_resolve_paths_against_the_group_file(demo_groups: Path):
    group = {g.group_id: g for g in load_groups(demo_groups)}["qwen2-tiny"]
    root = demo_groups.parent / ".demo"
    assert group.base_model == root / "bases/qwen2-tiny"
    assert group.donor("qwen2-tiny-donor").path == root / "donors/qwen2-tiny-donor"
    assert group.lens("qwen2-tiny-l1").checkpoint == root / "lenses/qwen2-tiny-l1"
    assert group.source_file == demo_groups / "qwen2-tiny.yaml"


def test_demo_groups_are_small_enough_to_exercise_the_host_tier():
    for group in load_groups(REPO / "groups"):
        assert group.dtype == "float32"
        assert group.replica.max_lenses_per_replica == 2
        assert group.replica.num_gpus == 0
        assert 0 < group.replica.num_cpus < 1
        assert group.replica.host_cache_bytes == int(0.5 * 1024**3)
        assert len(group.lenses) > group.replica.max_lenses_per_replica


# --- one precise line per problem ------------------------------------------------------


def test_unknown_key_names_file_and_field(tmp_path: Path, demo_dir: Path):
    group = qwen_group(demo_dir)
    group["lenses"][0]["colour"] = "red"
    groups_dir = write_groups(tmp_path, {"q.yaml": group})
    assert problems_of(groups_dir) == [
        f"{groups_dir}/q.yaml: lenses[0].colour: Extra inputs are not permitted"
    ]


def test_field_errors_name_each_field(tmp_path: Path, demo_dir: Path):
    group = qwen_group(demo_dir, group_id="Bad_Id", dtype="int8")
    group["replica"] = {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}
    del group["lenses"][0]["layer"]
    problems = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    shown = f"{tmp_path}/g/q.yaml"
    assert problems[0].startswith(f"{shown}: group_id: String should match pattern")
    assert problems[1].startswith(f"{shown}: dtype: Input should be 'float32'")
    assert f"{shown}: replica.autoscaling.min_replicas: 3 is greater than max_replicas (1)" in (
        problems
    )
    assert f"{shown}: lenses[0].layer: Field required" in problems
    assert len(problems) == 4


def test_duplicate_ids_and_unknown_donor_in_one_group(tmp_path: Path, demo_dir: Path):
    donor = {"id": "d", "path": str(demo_dir / "donors/qwen2-tiny-donor")}
    group = qwen_group(
        demo_dir,
        donors=[donor, donor],
        lenses=[
            lens(demo_dir, "x", "qwen2-tiny-l1", 1),
            lens(demo_dir, "x", "qwen2-tiny-l1", 1),
            lens(demo_dir, "y", "qwen2-tiny-l1-donor", 1, donor="nope"),
        ],
    )
    shown = f"{tmp_path}/g/q.yaml"
    assert problems_of(write_groups(tmp_path, {"q.yaml": group})) == [
        f"{shown}: donors[1].id: duplicate donor id 'd' (also donors[0])",
        f"{shown}: lenses[1].id: duplicate lens id 'x' (also lenses[0])",
        f"{shown}: lenses[2].donor: unknown donor 'nope' (donors here: d)",
    ]


def test_id_problems_are_reported_next_to_field_errors(tmp_path: Path, demo_dir: Path):
    group = qwen_group(demo_dir, dtype="int8")
    group["lenses"].append(dict(group["lenses"][0]))
    problems = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    assert any(": dtype: " in p for p in problems)
    assert f"{tmp_path}/g/q.yaml: lenses[1].id: duplicate lens id 'q-l1' (also lenses[0])" in (
        problems
    )


def test_group_ids_are_unique_across_files(tmp_path: Path, demo_dir: Path):
    a = qwen_group(demo_dir)
    b = qwen_group(demo_dir, lenses=[lens(demo_dir, "other", "qwen2-tiny-l1", 1)])
    groups_dir = write_groups(tmp_path, {"a.yaml": a, "b.yaml": b})
    assert problems_of(groups_dir) == [
        f"{groups_dir}/b.yaml: group_id: duplicate group id 'q' (also in {groups_dir}/a.yaml)"
    ]


def test_lens_ids_are_unique_across_groups(tmp_path: Path, demo_dir: Path):
    a = qwen_group(demo_dir)
    b = qwen_group(demo_dir, group_id="r")
    groups_dir = write_groups(tmp_path, {"a.yaml": a, "b.yaml": b})
    assert problems_of(groups_dir) == [
        f"{groups_dir}/b.yaml: lenses[0].id: lens id 'q-l1' is already used in "
        f"{groups_dir}/a.yaml; lens ids must be unique across all groups"
    ]


def test_missing_paths_name_their_field(tmp_path: Path, demo_dir: Path):
    group = qwen_group(
        demo_dir,
        base_model="../no-base",
        donors=[{"id": "d", "path": "../no-donor"}],
        lenses=[{"id": "a", "name": "A", "checkpoint": "../no-ckpt", "layer": 1}],
    )
    groups_dir = write_groups(tmp_path, {"q.yaml": group})
    assert problems_of(groups_dir) == [
        f"{groups_dir}/q.yaml: base_model: {tmp_path}/no-base does not exist",
        f"{groups_dir}/q.yaml: donors[0].path: {tmp_path}/no-donor does not exist",
        f"{groups_dir}/q.yaml: lenses[0].checkpoint: {tmp_path}/no-ckpt does not exist",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file; chmod cannot hide one")
def test_unreadable_checkpoint_is_reported(tmp_path: Path, demo_dir: Path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_dir / "lenses/qwen2-tiny-l1", ckpt)
    ckpt.chmod(0)
    try:
        group = qwen_group(
            demo_dir, lenses=[{**lens(demo_dir, "a", "x", 1), "checkpoint": "../ckpt"}]
        )
        groups_dir = write_groups(tmp_path, {"q.yaml": group})
        assert problems_of(groups_dir) == [
            f"{groups_dir}/q.yaml: lenses[0].checkpoint: {ckpt} is not readable"
        ]
    finally:
        ckpt.chmod(0o755)


def test_layer_must_equal_the_checkpoints_layer(tmp_path: Path, demo_dir: Path):
    group = qwen_group(demo_dir, lenses=[lens(demo_dir, "a", "qwen2-tiny-l1", 2)])
    [problem] = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    assert problem.startswith(
        f"{tmp_path}/g/q.yaml: lenses[0].layer: 2 does not match the checkpoint's layer_l 1 ("
    )


def test_lens_incompatible_with_its_base_is_refused(tmp_path: Path, demo_dir: Path):
    group = qwen_group(demo_dir, lenses=[lens(demo_dir, "a", "gemma2-tiny-l1", 1)])
    problems = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    assert problems
    assert all(p.startswith(f"{tmp_path}/g/q.yaml: lenses[0].checkpoint: ") for p in problems)
    assert all("\n" not in p for p in problems)


def test_donor_must_match_the_base(tmp_path: Path, demo_dir: Path):
    group = qwen_group(
        demo_dir,
        donors=[{"id": "g", "path": str(demo_dir / "bases/gemma2-tiny")}],
        lenses=[lens(demo_dir, "a", "qwen2-tiny-l1-donor", 1, donor="g")],
    )
    problems = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    shown = f"{tmp_path}/g/q.yaml: donors[0].path: donor 'g' has"
    assert f"{shown} model_type 'gemma2', the base has 'qwen2'" in problems
    assert all(p.startswith(shown) for p in problems)


def test_corrupt_checkpoint_is_one_line(tmp_path: Path, demo_dir: Path):
    ckpt = tmp_path / "corrupt"
    shutil.copytree(demo_dir / "lenses/qwen2-tiny-l1", ckpt)
    for path in ckpt.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    group = qwen_group(demo_dir, lenses=[{**lens(demo_dir, "a", "x", 1), "checkpoint": str(ckpt)}])
    [problem] = problems_of(write_groups(tmp_path, {"q.yaml": group}))
    assert problem.startswith(f"{tmp_path}/g/q.yaml: lenses[0].checkpoint: corrupt checkpoint ")


def test_bad_yaml_and_wrong_top_level(tmp_path: Path):
    groups_dir = write_groups(tmp_path, {"a.yaml": "group_id: [1, 2\n", "b.yaml": "- 1\n"})
    problems = problems_of(groups_dir)
    assert problems[0].startswith(f"{groups_dir}/a.yaml: not valid YAML at line 2, column 1: ")
    assert problems[1] == f"{groups_dir}/b.yaml: expected a mapping at the top level, got list"


def test_every_problem_of_every_file_in_one_error(tmp_path: Path, demo_dir: Path):
    a = qwen_group(demo_dir, lenses=[lens(demo_dir, "a", "qwen2-tiny-l1", 2)])
    b = qwen_group(demo_dir, group_id="r", dtype="float64")
    problems = problems_of(write_groups(tmp_path, {"a.yaml": a, "b.yaml": b}))
    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{tmp_path}/g/b.yaml", "dtype"],
        [f"{tmp_path}/g/a.yaml", "lenses[0].layer"],
    ]
    assert validate_groups(tmp_path / "g") == problems


def test_file_checks_can_be_skipped(tmp_path: Path):
    group = {
        "group_id": "x",
        "name": "X",
        "base_model": "nowhere",
        "lenses": [{"id": "a", "name": "A", "checkpoint": "nowhere", "layer": 0}],
    }
    [loaded] = load_groups(write_groups(tmp_path, {"x.yaml": group}))
    assert loaded.lens("a").checkpoint == tmp_path / "g" / "nowhere"


def test_empty_or_missing_groups_dir(tmp_path: Path):
    assert problems_of(tmp_path) == [f"{tmp_path}: no group files (*.yaml)"]
    assert validate_groups(tmp_path / "absent") == [f"{tmp_path / 'absent'}: not a directory"]


# --- models ----------------------------------------------------------------------------


def test_every_edge_model_field_is_described():
    models = [
        m
        for m in vars(config).values()
        if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == config.__name__
    ]
    assert len(models) >= 7
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        assert model.model_config.get("frozen"), model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_cache_sizes_convert_to_bytes_and_apply_as_user_config():
    spec = ReplicaSpec(host_cache_gb=1.5, device_memory_budget_gb=2)
    assert spec.host_cache_bytes == 1610612736
    assert spec.device_memory_budget_bytes == 2 * 1024**3
    changed = ReplicaConfig.model_validate({"max_lenses_per_replica": 3}).apply_to(spec)
    assert changed.max_lenses_per_replica == 3 and changed.host_cache_gb == 1.5
    options = spec.deployment_options()
    assert options["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    assert ReplicaConfig.model_validate(options["user_config"]).apply_to(spec) == spec
    with pytest.raises(ValidationError):
        ReplicaConfig.model_validate({"max_lenses": 3})


def test_api_keys_come_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key\n\n")
    monkeypatch.setenv("LENS_SERVE_API_KEYS", " a, b ,,")
    assert api_keys_from_env(AppArgs(api_keys_file=keys_file)) == {"a", "b", "file-key"}
    monkeypatch.delenv("LENS_SERVE_API_KEYS")
    assert api_keys_from_env(AppArgs()) == set()


def test_config_imports_without_torch_or_ray():
    code = "import sys, deployments.config; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


# --- serve_config.yaml -----------------------------------------------------------------


def test_serve_config_validates_and_names_every_group():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    [app] = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (
        "lens-serve",
        "/",
        "deployments.app:build_app",
    )
    args = AppArgs.model_validate(app.args)
    assert args.groups_dir == Path("groups") and args.max_text_length == 20000
    group_ids = {g.group_id for g in load_groups(REPO / args.groups_dir)}
    names = [d["name"] for d in data["applications"][0]["deployments"]]
    # Serve refuses an override for a deployment the app does not define.
    assert set(names) == {"Ingress"} | group_ids
    for deployment in data["applications"][0]["deployments"]:
        if deployment["name"] != "Ingress":
            ReplicaConfig.model_validate(deployment["user_config"])
            assert deployment["ray_actor_options"]["num_gpus"] == 0
