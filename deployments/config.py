"""Pydantic models of `groups/*.yaml` and of the application args, and their validation.

The edge of the data path: `build_app` and `lens-serve validate` turn YAML into these frozen
objects once; replicas and the ingress receive validated objects, never raw dicts. This is the
only module that reads environment variables. Rules: DESIGN.md §Model groups, STYLE.md §5.
Over 400 lines on purpose: the models and the on-disk checks are the one rule set that
`lens-serve validate` and `build_app` share, and reading them together is the point.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

GIB = 1024**3
GROUP_FILE_SUFFIXES = (".yaml", ".yml")
API_KEYS_ENV = "LENS_SERVE_API_KEYS"
# Lens and donor ids travel in URL paths and as Serve multiplexed model ids.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A group id is also a Serve deployment name; lower case keeps it apart from `Ingress`.
GROUP_ID_PATTERN = r"^[a-z0-9][a-z0-9.-]*$"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RELATIVE_FIELD = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")


class GroupConfigError(ValueError):
    """One or more group files are invalid; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid group configuration:\n" + "\n".join(problems))
        self.problems = problems


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the group file's directory (from the context)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    path = Path(value).expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if path.is_absolute() or base_dir is None:
        return path
    # abspath, not resolve(): a group file mounted from a ConfigMap is a symlink into a
    # hidden directory, and paths are relative to where the file appears.
    resolved = Path(os.path.abspath(Path(base_dir) / path))
    # DESIGN: "hub ids only if already cached": keep `org/name` as given when no such
    # directory exists next to the group file.
    if not resolved.exists() and _HUB_ID.match(str(value)):
        return path
    return resolved


class _Edge(BaseModel):
    """Base of every edge model: unknown keys are errors and objects never change."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AutoscalingSpec(_Edge):
    """Serve autoscaling bounds for one group deployment."""

    min_replicas: NonNegativeInt = Field(
        1, description="Replicas kept running; 0 lets an idle group free its GPU."
    )
    max_replicas: PositiveInt = Field(1, description="Upper bound on replicas.")
    target_ongoing_requests: PositiveFloat = Field(
        2, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas: {self.min_replicas} is greater than "
                f"max_replicas ({self.max_replicas})"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        """Return Serve's `autoscaling_config` dict."""
        return self.model_dump()


class ReplicaSpec(_Edge):
    """Per-replica resources and cache sizes of a group (DESIGN.md §Model groups)."""

    max_lenses_per_replica: PositiveInt = Field(
        8, description="Lenses resident on the device (Serve multiplex LRU size)."
    )
    host_cache_gb: NonNegativeFloat = Field(
        16, description="CPU-RAM tier for lenses evicted from the device, in GiB."
    )
    max_donors_per_replica: PositiveInt = Field(
        1, description="Donor models cached per replica (LRU by path)."
    )
    num_gpus: NonNegativeFloat = Field(1, description="GPUs per replica; 0 on a CPU machine.")
    num_cpus: NonNegativeFloat = Field(1, description="Logical CPUs per replica.")
    device_memory_budget_gb: PositiveFloat | None = Field(
        None, description="Cap on device memory for base, lenses and donors, in GiB; None: all."
    )
    max_ongoing_requests: PositiveInt = Field(
        8, description="Requests one replica runs at once (Serve max_ongoing_requests)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests queued per handle before 503; -1: no limit."
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Serve autoscaling bounds."
    )

    @property
    def host_cache_bytes(self) -> int:
        """Host-RAM tier size in bytes."""
        return int(self.host_cache_gb * GIB)

    @property
    def device_memory_budget_bytes(self) -> int | None:
        """Device memory cap in bytes, or None for no cap."""
        if self.device_memory_budget_gb is None:
            return None
        return int(self.device_memory_budget_gb * GIB)

    def user_config(self) -> dict[str, Any]:
        """Return the cache sizes as the `user_config` dict that `reconfigure` takes."""
        return ReplicaConfig(
            max_lenses_per_replica=self.max_lenses_per_replica,
            host_cache_gb=self.host_cache_gb,
            max_donors_per_replica=self.max_donors_per_replica,
            device_memory_budget_gb=self.device_memory_budget_gb,
        ).model_dump(exclude_none=True)

    def deployment_options(self) -> dict[str, Any]:
        """Return the `serve.deployment` options this block implies (before serve_config)."""
        return {
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "autoscaling_config": self.autoscaling.to_serve(),
            "user_config": self.user_config(),
        }


class ReplicaConfig(_Edge):
    """The `user_config` a group replica applies in `reconfigure`, without a restart.

    A field left out keeps the value from the group file.
    """

    max_lenses_per_replica: PositiveInt | None = Field(
        None, description="Lenses resident on the device."
    )
    host_cache_gb: NonNegativeFloat | None = Field(None, description="Host-RAM tier, in GiB.")
    max_donors_per_replica: PositiveInt | None = Field(
        None, description="Donor models cached per replica."
    )
    device_memory_budget_gb: PositiveFloat | None = Field(
        None, description="Cap on device memory, in GiB."
    )

    def apply_to(self, replica: ReplicaSpec) -> ReplicaSpec:
        """Return `replica` with the fields set here replaced."""
        return replica.model_copy(update=self.model_dump(exclude_none=True))


class DonorSpec(_Edge):
    """A model whose activations a lens reads instead of the base's."""

    donor_id: str = Field(alias="id", pattern=ID_PATTERN, description="Donor id in this group.")
    path: Path = Field(description="Donor model directory (HF layout); relative to the file.")

    _resolve = field_validator("path", mode="before")(_resolve_path)


class LensSpec(_Edge):
    """One lens: a checkpoint served on the group's base."""

    lens_id: str = Field(
        alias="id", pattern=ID_PATTERN, description="Lens id, unique across all groups."
    )
    name: str = Field(description="Human-readable name.")
    checkpoint: Path = Field(
        description="Run directory (highest step wins) or one checkpoint file."
    )
    layer: NonNegativeInt = Field(description="Base layer read; must equal the checkpoint's.")
    donor: str | None = Field(None, description="Donor id from this group, or null for the base.")
    batch_size: PositiveInt = Field(48, description="Positions per decode batch.")
    visible: bool = Field(True, description="Listed on the web page.")

    _resolve = field_validator("checkpoint", mode="before")(_resolve_path)


class GroupSpec(_Edge):
    """One model group: a base model and the lenses served on it (one Serve deployment)."""

    group_id: str = Field(
        pattern=GROUP_ID_PATTERN, description="Group id; also the Serve deployment name."
    )
    name: str = Field(description="Human-readable name.")
    description: str = Field("", description="One line about the base model.")
    base_model: Path = Field(description="Base model directory (HF layout) or a cached hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the base and lenses run in."
    )
    visible: bool = Field(True, description="Listed on the web page.")
    replica: ReplicaSpec = Field(
        default_factory=ReplicaSpec, description="Replica defaults; serve_config may override."
    )
    donors: list[DonorSpec] = Field(default_factory=list, description="Donor models.")
    lenses: list[LensSpec] = Field(min_length=1, description="Lenses served on this base.")
    source_file: Path | None = Field(
        None, description="The group file this came from (set by the loader).", exclude=True
    )

    _resolve = field_validator("base_model", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _check_ids(self) -> GroupSpec:
        problems = _id_problems(
            [d.donor_id for d in self.donors], [(x.lens_id, x.donor) for x in self.lenses]
        )
        if problems:
            # One line per problem; `_format_validation_error` splits them again.
            raise ValueError("\n".join(problems))
        return self

    def lens(self, lens_id: str) -> LensSpec:
        """Return the lens with this id; KeyError if the group has none."""
        for lens in self.lenses:
            if lens.lens_id == lens_id:
                return lens
        raise KeyError(lens_id)

    def donor(self, donor_id: str) -> DonorSpec:
        """Return the donor with this id; KeyError if the group has none."""
        for donor in self.donors:
            if donor.donor_id == donor_id:
                return donor
        raise KeyError(donor_id)


def _id_problems(donor_ids: list[Any], lenses: list[tuple[Any, Any]]) -> list[str]:
    """Duplicate donor and lens ids, and lenses naming an unknown donor, one line each.

    Takes plain values so the loader can also run it on raw YAML that failed field checks.
    """
    problems = _duplicates(donor_ids, "donors", "donor id")
    problems += _duplicates([lens_id for lens_id, _ in lenses], "lenses", "lens id")
    known = {d for d in donor_ids if d is not None}
    for i, (_, donor) in enumerate(lenses):
        if donor is not None and donor not in known:
            listed = ", ".join(sorted(map(str, known))) or "none"
            problems.append(f"lenses[{i}].donor: unknown donor {donor!r} (donors here: {listed})")
    return problems


def _raw_id_problems(data: dict[str, Any]) -> list[str]:
    """Run `_id_problems` on raw YAML data, skipping entries too malformed to read."""
    donors = data.get("donors") if isinstance(data.get("donors"), list) else []
    lenses = data.get("lenses") if isinstance(data.get("lenses"), list) else []
    donor_ids = [d.get("id") for d in donors if isinstance(d, dict)]
    lens_items = [(x.get("id"), x.get("donor")) for x in lenses if isinstance(x, dict)]
    if len(donor_ids) != len(donors) or len(lens_items) != len(lenses):
        return []  # indices would not match the file; the field errors cover these entries
    return _id_problems(donor_ids, lens_items)


def _duplicates(ids: list[Any], field: str, what: str) -> list[str]:
    """Return one problem line per repeated id, naming its second occurrence."""
    seen: dict[Any, int] = {}
    problems = []
    for i, item in enumerate(ids):
        if item is None:
            continue
        if item in seen:
            problems.append(
                f"{field}[{i}].id: duplicate {what} {item!r} (also {field}[{seen[item]}])"
            )
        else:
            seen.setdefault(item, i)
    return problems


class AppArgs(_Edge):
    """The `args` of the `lens-serve` application in serve_config.yaml."""

    groups_dir: Path = Field(
        Path("groups"), description="Directory of group files; relative to the working dir."
    )
    max_text_length: PositiveInt = Field(20000, description="Longest text accepted, in chars.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: none."
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line; keys are also read from the env."
    )
    log_request_text: bool = Field(False, description="Log request text (off: it may be private).")
    request_timeout_s: PositiveFloat = Field(300, description="Per-request timeout, in seconds.")
    rate_limit_per_minute: PositiveInt | None = Field(
        None, description="Requests per minute per API key; None: no limit."
    )


def api_keys_from_env(args: AppArgs) -> set[str]:
    """Return the accepted API keys: `LENS_SERVE_API_KEYS` (comma-separated) and the keys file.

    An empty set means authentication is off. Lines of the keys file that are blank or start
    with `#` are skipped.
    """
    keys = {k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()}
    if args.api_keys_file is not None:
        for line in args.api_keys_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.add(line)
    return keys


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _format_validation_error(shown: str, exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into `file: field: message` lines."""
    lines = []
    for err in exc.errors(include_url=False):
        prefix = _loc_text(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        for part in msg.splitlines():
            # Our model validators start each line with the field path relative to the model
            # they check; join it to where that model sits in the file.
            if err["type"] == "value_error" and _RELATIVE_FIELD.match(part):
                part_field, _, text = part.partition(": ")
                field = f"{prefix}.{part_field}" if prefix else part_field
                lines.append(f"{shown}: {field}: {text}")
            else:
                lines.append(f"{shown}: {prefix}: {part}" if prefix else f"{shown}: {part}")
    return lines


def _read_group_file(path: Path, shown: str) -> tuple[GroupSpec | None, list[str]]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        return None, [f"{shown}: cannot read: {exc}"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(exc, "problem", None) or str(exc)
        return None, [f"{shown}: not valid YAML{where}: {why}"]
    if not isinstance(data, dict):
        return None, [f"{shown}: expected a mapping at the top level, got {type(data).__name__}"]
    if "source_file" in data:
        return None, [f"{shown}: source_file: Extra inputs are not permitted"]
    data["source_file"] = Path(os.path.abspath(path))
    try:
        group = GroupSpec.model_validate(data, context={"base_dir": data["source_file"].parent})
    except ValidationError as exc:
        problems = _format_validation_error(shown, exc)
        # Pydantic runs the after-validator only when every field parsed; report the id
        # problems anyway so one run shows all of them.
        if not any(e["loc"] == () for e in exc.errors()):
            problems += [f"{shown}: {line}" for line in _raw_id_problems(data)]
        return None, problems
    return group, []


def _group_files(groups_dir: Path) -> list[Path]:
    return sorted(p for p in groups_dir.iterdir() if p.suffix in GROUP_FILE_SUFFIXES)


def load_groups(groups_dir: Path | str, *, check_checkpoints: bool = True) -> list[GroupSpec]:
    """Read and validate every group file in `groups_dir`.

    Args:
        groups_dir: directory holding `*.yaml` / `*.yml` group files.
        check_checkpoints: also read base configs, donors and every checkpoint
            (lenscore) and check compatibility; off, only the files themselves are checked.

    Returns:
        The groups, ordered by file name.

    Raises:
        GroupConfigError: listing every problem found, one `file: field: message` line each.

    """
    groups_dir = Path(groups_dir)
    if not groups_dir.is_dir():
        raise GroupConfigError([f"{groups_dir}: not a directory"])
    loaded: list[tuple[GroupSpec, str]] = []
    problems: list[str] = []
    files = _group_files(groups_dir)
    if not files:
        problems.append(f"{groups_dir}: no group files (*.yaml)")
    for path in files:
        group, errors = _read_group_file(path, str(path))
        problems += errors
        if group is not None:
            loaded.append((group, str(path)))
    problems += _cross_group_problems(loaded)
    if check_checkpoints:
        for group, shown in loaded:
            problems += check_group_files(group, shown)
    if problems:
        raise GroupConfigError(problems)
    return [group for group, _ in loaded]


def _cross_group_problems(loaded: list[tuple[GroupSpec, str]]) -> list[str]:
    """Group ids unique across files and lens ids unique across all groups."""
    problems = []
    group_owner: dict[str, str] = {}
    lens_owner: dict[str, str] = {}
    for group, shown in loaded:
        if group.group_id in group_owner:
            problems.append(
                f"{shown}: group_id: duplicate group id {group.group_id!r} "
                f"(also in {group_owner[group.group_id]})"
            )
        group_owner.setdefault(group.group_id, shown)
        for i, lens in enumerate(group.lenses):
            if lens.lens_id in lens_owner and lens_owner[lens.lens_id] != shown:
                problems.append(
                    f"{shown}: lenses[{i}].id: lens id {lens.lens_id!r} is already used in "
                    f"{lens_owner[lens.lens_id]}; lens ids must be unique across all groups"
                )
            lens_owner.setdefault(lens.lens_id, shown)
    return problems


def validate_groups(groups_dir: Path | str) -> list[str]:
    """Return every problem of the group files in `groups_dir`, one line each; [] when fine."""
    try:
        load_groups(groups_dir, check_checkpoints=True)
    except GroupConfigError as exc:
        return exc.problems
    return []


def _check_readable(path: Path, field: str, shown: str) -> str | None:
    """Return a problem line when `path` is missing or unreadable, else None."""
    if not path.exists():
        return f"{shown}: {field}: {path} does not exist"
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        return f"{shown}: {field}: {path} is not readable"
    return None


def _is_cached_hub_id(path: Path) -> bool:
    if path.is_absolute() or not _HUB_ID.match(str(path)):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(str(path), "config.json"), str)


def check_group_files(group: GroupSpec, shown: str) -> list[str]:
    """Check one group's base, donors and checkpoints on disk, with lenscore; [] when fine.

    `shown` is the file name used at the start of each line.
    """
    from lenscore import LensError, read_base_info

    base_info = None
    problem = None
    if not _is_cached_hub_id(group.base_model):
        problem = _check_readable(group.base_model, "base_model", shown)
    if problem:
        problems = [problem]
    else:
        problems = []
        try:
            base_info = read_base_info(group.base_model)
        except (LensError, OSError, ValueError) as exc:
            problems.append(f"{shown}: base_model: cannot read {group.base_model}: {exc}")
    for i, donor in enumerate(group.donors):
        problems += _check_donor(donor, base_info, f"donors[{i}].path", shown)
    for i, lens in enumerate(group.lenses):
        problems += _check_lens(lens, base_info, f"lenses[{i}]", shown)
    return problems


def _check_donor(donor: DonorSpec, base_info: Any, field: str, shown: str) -> list[str]:
    from lenscore import LensError, read_base_info

    problem = _check_readable(donor.path, field, shown)
    if problem:
        return [problem]
    try:
        info = read_base_info(donor.path)
    except (LensError, OSError, ValueError) as exc:
        return [f"{shown}: {field}: cannot read donor {donor.donor_id!r}: {exc}"]
    if base_info is None:
        return []
    problems = []
    for attr, what in (
        ("model_type", "model_type"),
        ("d", "hidden size"),
        ("n_layers", "layer count"),
        ("vocab_size", "vocabulary size"),
    ):
        mine, base = getattr(info, attr), getattr(base_info, attr)
        if mine != base:
            problems.append(
                f"{shown}: {field}: donor {donor.donor_id!r} has {what} {mine!r}, "
                f"the base has {base!r}"
            )
    return problems


def _check_lens(lens: LensSpec, base_info: Any, field: str, shown: str) -> list[str]:
    from lenscore import LensError, check_compat, read_checkpoint

    problem = _check_readable(lens.checkpoint, f"{field}.checkpoint", shown)
    if problem:
        return [problem]
    try:
        raw = read_checkpoint(lens.checkpoint)
    except LensError as exc:
        return [f"{shown}: {field}.checkpoint: {exc.message}"]
    for skipped, why in raw.fell_back_from:
        logger.warning(
            "%s: %s.checkpoint: skipped %s (%s), using %s", shown, field, skipped, why, raw.path
        )
    problems = []
    if raw.layer_l != lens.layer:
        problems.append(
            f"{shown}: {field}.layer: {lens.layer} does not match the checkpoint's "
            f"layer_l {raw.layer_l} ({raw.path})"
        )
    if base_info is not None:
        problems += [f"{shown}: {field}.checkpoint: {p}" for p in check_compat(raw, base_info)]
    return problems
