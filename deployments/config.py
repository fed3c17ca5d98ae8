"""Pydantic models of `groups/*.yaml` and of the application args, and their validation.

The edge of the data path: `build_app` and `lens-serve validate` turn YAML into these frozen
objects once; replicas and the ingress receive validated objects, never raw dicts. This is the
only module that reads environment variables. Rules: DESIGN.md §Model groups, STYLE.md §5.
`group_files.py` reads the files into these models; `checks.py` checks what they name on
disk (bases, donors, checkpoints). A little over 400 lines: every field carries its
description (it is the operator's reference, shown by `/docs` and the validator), and
splitting the group-file models from the app args would split one rule set.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

GIB = 1024**3
API_KEYS_ENV = "LENS_SERVE_API_KEYS"
# Lens and donor ids travel in URL paths and as Serve multiplexed model ids.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A group id is also a Serve deployment name; lower case keeps it apart from `Ingress`.
GROUP_ID_PATTERN = r"^[a-z0-9][a-z0-9.-]*$"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    if not resolved.exists() and HUB_ID.match(str(value)):
        return path
    return resolved


def _resolve_dir(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative directory against the group file's directory (no hub ids)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    path = Path(value).expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if path.is_absolute() or base_dir is None:
        return path
    return Path(os.path.abspath(Path(base_dir) / path))


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
    predictive_prefetch: bool = Field(
        False,
        description="When the replica is idle, read the lenses most likely requested next "
        "(counted lens-to-lens transitions) into the host tier, within host_cache_gb.",
    )
    packed_cache_dir: Path | None = Field(
        None,
        description="Directory of packed lens files written by `lens-serve pack`, relative to "
        "the group file; a lens's fresh packed file is read instead of its trainer checkpoint. "
        "None: trainer checkpoints only.",
    )

    batch_max_rows: NonNegativeInt = Field(
        256,
        description="Rows (positions x samples) of concurrent analyses, of one lens or of "
        "several lenses of the group, packed into one decode or encode pass; 0: every "
        "analysis runs alone in its own thread.",
    )
    batch_max_wait_ms: NonNegativeFloat = Field(
        2.0,
        description="How long a pass may wait for rows of requests already inside the "
        "replica, in milliseconds; a lone request never waits.",
    )
    activation_cache_mb: NonNegativeFloat = Field(
        256,
        description="Activations kept per replica for repeated (text, layer, model), LRU by "
        "bytes, on the replica's device, in MiB; 0: off.",
    )

    _resolve = field_validator("packed_cache_dir", mode="before")(_resolve_dir)

    @property
    def activation_cache_bytes(self) -> int:
        """Activation cache size in bytes."""
        return int(self.activation_cache_mb * 1024**2)

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
            predictive_prefetch=self.predictive_prefetch,
            packed_cache_dir=self.packed_cache_dir,
            batch_max_rows=self.batch_max_rows,
            batch_max_wait_ms=self.batch_max_wait_ms,
            activation_cache_mb=self.activation_cache_mb,
        ).model_dump(mode="json", exclude_none=True)

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
    predictive_prefetch: bool | None = Field(
        None, description="Prefetch likely next lenses into the host tier when idle."
    )
    packed_cache_dir: Path | None = Field(
        None, description="Directory of packed lens files (absolute, or relative to the cwd)."
    )
    batch_max_rows: NonNegativeInt | None = Field(
        None, description="Rows per shared decode/encode pass; 0: no batching across requests."
    )
    batch_max_wait_ms: NonNegativeFloat | None = Field(
        None, description="Longest wait of a pass for more rows, in milliseconds."
    )
    activation_cache_mb: NonNegativeFloat | None = Field(
        None, description="Activation cache per replica, in MiB; 0: off."
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


def raw_id_problems(data: dict[str, Any]) -> list[str]:
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
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (besides IP addresses and localhost) that requests may be "
        "addressed to while API keys are off, against DNS rebinding; ['*']: any.",
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line; keys are also read from the env."
    )
    log_request_text: bool = Field(False, description="Log request text (off: it may be private).")
    request_timeout_s: PositiveFloat = Field(300, description="Per-request timeout, in seconds.")
    rate_limit_per_minute: PositiveInt | None = Field(
        None,
        description="Requests per minute per API key (or client address), counted by each "
        "ingress replica; None: no limit.",
    )
    group_reload_s: NonNegativeFloat = Field(
        2.0,
        description="Seconds between checks of the group files for lens changes (live "
        "add, remove, re-point); 0: never.",
    )
    strict_startup: bool = Field(
        False,
        description="Refuse to start when any base, donor or checkpoint fails its check; "
        "off: serve everything else and report the failures.",
    )
    public_docs: bool | None = Field(
        None,
        description="Serve /docs and /openapi.json without a key; None: only when API keys "
        "are off.",
    )
    jobs_ttl_s: PositiveFloat = Field(
        3600, description="Seconds a finished job's result is kept; later reads answer 410."
    )
    jobs_max_count: PositiveInt = Field(
        1000, description="Jobs kept per app; finished ones are dropped first to make room."
    )
    jobs_max_bytes: PositiveInt = Field(
        512 * 1024**2, description="Bytes of job requests and results kept per app."
    )
    jobs_max_running: PositiveInt = Field(
        4, description="Jobs one ingress replica runs at once; more stay queued."
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
