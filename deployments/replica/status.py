"""The typed status of one group replica: what it holds, uses and has measured.

`GroupServer` builds a `ReplicaStatus` after every change and pushes it to the registry
(`replica/registry.py`); the ingress reads it from there for the groups list, lens info and
group status (DESIGN §Response shapes), and the HTTP schemas use these models as they are.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Status(BaseModel):
    # Frozen: a snapshot is shared by the registry and every reader; nobody edits it.
    # Extra keys are ignored, so a newer replica's fields do not break an older ingress.
    model_config = ConfigDict(frozen=True, extra="ignore")


class ReplicaMemory(_Status):
    """Bytes held by kind (accounted tensors) and the device's own readings."""

    base_bytes: int = Field(0, description="The base model's tensors.")
    lens_bytes: int = Field(0, description="Lenses on the device.")
    donor_bytes: int = Field(0, description="Donor models.")
    host_bytes: int = Field(0, description="Lenses in the host-RAM tier.")
    allocated_bytes: int = Field(
        0, description="CUDA allocator's allocated bytes; process RSS on CPU."
    )
    free_bytes: int = Field(0, description="Driver's free bytes; host MemAvailable on CPU.")
    total_bytes: int = Field(0, description="Device total; host MemTotal on CPU.")


class LensFailure(_Status):
    """Why a lens could not load on this replica, and when it is tried again."""

    code: str = Field(description="The lenscore error code, e.g. `corrupt_checkpoint`.")
    message: str
    retry_in_seconds: float = Field(0.0, description="Back-off left before the next try.")


class ReplicaLenses(_Status):
    """Lens ids per tier (least recently used first) and failed lenses with the reason."""

    device: list[str] = Field(default_factory=list)
    host: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict, description="Lens id -> message.")


class LoadStats(_Status):
    """Measured switches or loads of one kind: how many, mean seconds and bytes."""

    count: int = 0
    mean_seconds: float = 0.0
    mean_bytes: float = 0.0


class PrefetchCounts(_Status):
    """Disk reads ahead of Serve's lock and predictive prefetch on one replica."""

    enabled: bool = Field(False, description="`predictive_prefetch` is on.")
    prefetched: int = Field(0, description="Lenses read into the host tier by a prefetch.")
    hits: int = Field(0, description="Requests whose lens a prefetch had put in the host tier.")
    unused: int = Field(0, description="Prefetched lenses dropped from the host tier unused.")
    no_room: int = Field(0, description="Candidates skipped: the host tier had no room.")
    failed: int = Field(0, description="Prefetch reads that failed (the request reports it).")
    reads_started: int = Field(0, description="Disk reads started ahead of the multiplex lock.")


class BatchingStats(_Status):
    """The batching scheduler: settings and what its shared passes held."""

    max_rows: int = Field(0, description="Rows per shared pass (`batch_max_rows`); 0: off.")
    max_wait_ms: float = Field(0.0, description="Longest wait of a pass for more rows.")
    passes: int = Field(0, description="Decode and encode passes run.")
    rows: int = Field(0, description="Rows over all passes (positions x samples).")
    mean_rows_per_pass: float = Field(0.0, description="rows / passes.")
    shared_passes: int = Field(0, description="Passes holding rows of more than one request.")
    multi_lens_passes: int = Field(0, description="Passes holding rows of several lenses.")
    requests: int = Field(0, description="Analyses that left the scheduler.")
    queued_requests: int = Field(0, description="Analyses in the scheduler now.")


class ActivationCacheStats(_Status):
    """The activation cache: lookups and what it holds."""

    hits: int = Field(0, description="Lookups answered without a base or donor forward.")
    misses: int = Field(0, description="Lookups that ran the forward.")
    entries: int = 0
    cached_bytes: int = Field(0, description="Activations and keys held.")
    max_bytes: int = Field(0, description="`activation_cache_mb` in bytes; 0: off.")


class ReplicaStatus(_Status):
    """One running replica of a group (an entry of `GET /api/v2/groups/{id}/status`)."""

    group_id: str
    replica_id: str
    app_name: str = Field("", description="Serve application the replica belongs to.")
    actor_name: str | None = Field(None, description="Ray actor name (liveness check).")
    device: str = Field(description="`cuda:0` or `cpu`.")
    memory: ReplicaMemory
    base_loads: int = 1
    lenses: ReplicaLenses
    failures: dict[str, LensFailure] = Field(
        default_factory=dict, description="Failed lenses with their error code."
    )
    lens_bytes: dict[str, int] = Field(default_factory=dict, description="Device lens sizes.")
    donors: list[str] = Field(default_factory=list, description="Donor ids held.")
    donor_loads: int = 0
    in_flight: int = Field(0, description="Requests inside the replica right now.")
    busy_threads: int = Field(
        0, description="Torch threads still running, a cancelled request's until it stops."
    )
    switches: dict[str, int] = Field(default_factory=dict, description="Switches by kind.")
    prefetch: PrefetchCounts = Field(
        default_factory=PrefetchCounts, description="Reads ahead and predictive prefetch."
    )
    loads: dict[str, int] = Field(default_factory=dict, description="Device loads per lens.")
    load_history: dict[str, LoadStats] = Field(
        default_factory=dict, description="Measured switch kinds, and `base`."
    )
    max_lenses_per_replica: int = 0
    host_cache_bytes: int = 0
    batching: BatchingStats = Field(
        default_factory=BatchingStats, description="Shared passes of concurrent analyses."
    )
    activation_cache: ActivationCacheStats = Field(
        default_factory=ActivationCacheStats, description="Activations shared across lenses."
    )
    updated_at: float = Field(0.0, description="Unix time of this snapshot.")

    def tier_of(self, lens_id: str) -> str | None:
        """Return `device`, `host` or None (disk only) for a lens on this replica."""
        if lens_id in self.lenses.device:
            return "device"
        if lens_id in self.lenses.host:
            return "host"
        return None
